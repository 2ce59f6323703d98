"""`deltactl cache ls / verify / prune`: the local cache of pulled deltas (DELTACTL_HOME), like
`hf cache`. Only local files are touched; no registry is contacted."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from registry.client import settings
from registry.client.cache import DeltaCache

from . import errors as exit_codes
from .console import emit_json, err, human_bytes, out
from .errors import handle_errors

cache_app = typer.Typer(help="The local cache of pulled deltas (DELTACTL_HOME).", no_args_is_help=True)
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _line(text: str) -> None:
    """A result line on stdout, never hard-wrapped (digests and paths stay whole)."""
    out.print(text, soft_wrap=True)


def _note(text: str) -> None:
    """A note for humans on stderr."""
    err.print(text, soft_wrap=True)


def _cache() -> DeltaCache:
    return DeltaCache(settings.deltactl_home())


@cache_app.command("ls")
@handle_errors
def cache_ls_cmd(as_json: Json = False) -> None:
    """List the cached versions: registry, reference, codec, size, last use, path.

    Example: deltactl cache ls --json
    """
    cache = _cache()
    entries = cache.entries()
    total = sum(b.stat().st_size for b in cache.blobs())
    if as_json:
        emit_json({"root": str(cache.root), "entries": [e.as_dict() for e in entries], "blob_bytes": total})
        return
    if not entries:
        _note(f"the cache at {cache.root} holds no deltas")
        return
    table = Table("ref", "registry", "codec", "size", "last used", "path")
    for e in entries:
        size = human_bytes(e.raw_size) if e.present else "[red]missing[/]"
        table.add_row(
            e.ref, e.registry, e.codec or "-", size, e.last_used.strftime("%Y-%m-%d %H:%M"), str(e.path)
        )
    out.print(table)
    _line(f"{len(entries)} version(s), {human_bytes(total)} of deltas under {cache.root}")


@cache_app.command("verify")
@handle_errors
def cache_verify_cmd(
    keep: Annotated[
        bool, typer.Option("--keep", help="Only report corrupt deltas; do not remove them.")
    ] = False,
    as_json: Json = False,
) -> None:
    """Re-hash every cached delta against its sha256 and report corruption.

    Corrupt deltas are removed (the next pull downloads them again) and the command exits
    with code 7.

    Example: deltactl cache verify
    """
    report = _cache().verify(remove_corrupt=not keep)
    if as_json:
        emit_json(report.as_dict())
    else:
        for bad in report.corrupt:
            refs = ", ".join(bad["refs"]) or "no version"
            action = "removed; pull again to restore it" if bad["removed"] else "kept (--keep)"
            _note(
                f"[red]corrupt[/] {bad['path']} ({refs}): sha256 is "
                f"{bad['actual']}, expected {bad['expected']}; {action}"
            )
        for ref in report.missing:
            _note(f"[yellow]missing[/] {ref}: its delta is no longer in the cache; pull again to restore it")
        verdict = "all intact" if report.ok else f"{len(report.corrupt)} corrupt"
        _line(f"verified {report.checked} delta(s), {human_bytes(report.bytes)}: {verdict}")
    if not report.ok:
        raise typer.Exit(exit_codes.EXIT_INVALID)


@cache_app.command("prune")
@handle_errors
def cache_prune_cmd(
    older_than: Annotated[
        float | None,
        typer.Option("--older-than", min=0, help="Also drop versions not pulled for this many days."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be removed.")] = False,
    as_json: Json = False,
) -> None:
    """Remove partial downloads, abandoned push state and unused deltas.

    With --older-than, versions not pulled for that many days go too.

    Example: deltactl cache prune --older-than 30
    """
    report = _cache().prune(older_than_days=older_than, dry_run=dry_run)
    if as_json:
        emit_json(report.as_dict())
        return
    for item in report.removed:
        _note(
            f"{'would remove' if dry_run else 'removed'} {item['kind']}: "
            f"{item['path']} ({human_bytes(item['bytes'])})"
        )
    verb = "would free" if dry_run else "freed"
    _line(f"{verb} {human_bytes(report.freed)} ({len(report.removed)} file(s))")


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")
