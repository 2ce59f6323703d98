"""`deltactl login / logout / whoami / push / pull / list / show / tag / rm / base`: the registry
from the command line. Every command is a thin call into `registry.client.RegistryApi`."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from registry.client import PullResult, PushResult, Ref, RegistryApi, RepoInfo, VersionInfo, parse_ref
from registry.common.errors import InvalidRequestError

from . import errors as exit_codes
from .console import emit_json, err, human_bytes, out
from .errors import handle_errors

Registry = Annotated[
    str | None,
    typer.Option(
        "--registry",
        help="Registry URL (default: DELTACTL_REGISTRY, the saved login, or http://127.0.0.1:8000).",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _line(text: str) -> None:
    """A result line on stdout, never hard-wrapped (digests and paths stay whole)."""
    out.print(text, soft_wrap=True)


def _note(text: str) -> None:
    """A note for humans on stderr."""
    err.print(text, soft_wrap=True)


base_app = typer.Typer(
    help="Base models the registry knows (deltas are indexed per base).", no_args_is_help=True
)


class _IfSized(ProgressColumn):
    """A column shown only for phases that know their byte count (not 'compressing', 'verifying')."""

    def __init__(self, column: ProgressColumn):
        super().__init__()
        self.column = column

    def render(self, task) -> Text:
        return self.column.render(task) if task.total is not None else Text("")


class _Bars:
    """The client's `Progress` drawn with rich on stderr: bytes, speed, ETA per phase. Silent
    when stderr is not a terminal."""

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._task = None

    def start(self, phase: str, total: int | None, completed: int = 0) -> None:
        if not err.is_terminal:
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                _IfSized(DownloadColumn()),
                _IfSized(TransferSpeedColumn()),
                _IfSized(TimeRemainingColumn()),
                console=err,
                transient=True,
            )
            self._progress.start()
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(phase, total=total, completed=completed)

    def advance(self, n: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress = self._task = None


@contextlib.contextmanager
def _api(registry: str | None) -> Iterator[RegistryApi]:
    api = RegistryApi(registry)
    try:
        yield api
    finally:
        api.close()


def _when(stamp: str | None) -> str:
    if not stamp:
        return "-"
    try:
        return dt.datetime.fromisoformat(stamp).astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return stamp


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"


def fidelity_summary(fidelity: dict | None) -> str:
    """A few figures of a fidelity record for a table cell."""
    if not fidelity:
        return "-"
    preferred = ("gain_recovered", "kl_to_finetuned", "top1_agreement", "greedy_agreement", "loss", "kl")
    keys = [k for k in preferred if k in fidelity] or [
        k for k, v in fidelity.items() if isinstance(v, (int, float))
    ]
    cells = []
    for key in keys[:3]:
        value = fidelity[key]
        cells.append(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(cells) or "recorded"


# --- login ---------------------------------------------------------------------------------------
@handle_errors
def login_cmd(
    registry: Registry = None,
    token: Annotated[
        str | None,
        typer.Option("--token", help="API token; asked for when omitted (DELTACTL_TOKEN is used if set)."),
    ] = None,
    as_json: Json = False,
) -> None:
    """Log in: check a token against the registry and save it (mode 0600 under DELTACTL_HOME).

    The registry becomes the default for later commands.

    Example: deltactl login --registry https://deltas.example.com
    """
    import os

    with _api(registry) as api:
        if token is None:
            token = os.environ.get("DELTACTL_TOKEN") or typer.prompt(
                "Token (empty for a registry without auth)",
                default="",
                hide_input=True,
                show_default=False,
                err=True,
            )
        who = api.login(token or None)
        if as_json:
            emit_json({"registry": api.endpoint, **who})
            return
        if not who.get("auth_enabled"):
            _line(f"{api.endpoint} does not check tokens (auth is off); saved it as the default registry")
        else:
            _line(f"logged in to {api.endpoint} as {who['name']}; token saved under {api.home} (mode 0600)")


@handle_errors
def logout_cmd(registry: Registry = None) -> None:
    """Forget the token saved for the registry.

    Example: deltactl logout
    """
    with _api(registry) as api:
        removed = api.logout()
        _line(
            f"removed the saved token for {api.endpoint}"
            if removed
            else f"no token was saved for {api.endpoint}"
        )


@handle_errors
def whoami_cmd(registry: Registry = None, as_json: Json = False) -> None:
    """Show who the registry takes you for, and your scopes.

    Example: deltactl whoami --json
    """
    with _api(registry) as api:
        who = api.whoami()
        if as_json:
            emit_json({"registry": api.endpoint, **who})
            return
        scopes = ", ".join(f"{ns}:{perm}" for ns, perm in sorted(who.get("scopes", {}).items())) or "none"
        auth = "" if who.get("auth_enabled") else " (auth is off: everyone may do everything)"
        _line(f"{who['name']} on {api.endpoint}; scopes {scopes}{auth}")


# --- push / pull ---------------------------------------------------------------------------------
@handle_errors
def push_cmd(
    file: Annotated[Path, typer.Argument(help="The delta (.bdelta) to push.")],
    repo: Annotated[
        str, typer.Argument(metavar="NAMESPACE/NAME", help="Repository to push to (created if missing).")
    ],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            "--base-name",
            help=(
                "Base model of a new repository (default: the delta's base_model); overrides a "
                "recorded name that is not org/model."
            ),
        ),
    ] = None,
    base_path: Annotated[
        Path | None,
        typer.Option(
            "--base-path", help="Local base checkpoint: registers the base first when the registry lacks it."
        ),
    ] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag the new version (repeatable).")] = None,
    description: Annotated[
        str, typer.Option("--description", help="Description of a new repository and of this version.")
    ] = "",
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    registry: Registry = None,
    as_json: Json = False,
) -> None:
    """Validate FILE, upload it and publish it as the next version of NAMESPACE/NAME.

    Bytes go straight to S3 through presigned URLs when the registry uses S3, parts in
    parallel. Identical bytes are not sent again. An interrupted push resumes: run the same command again
    and only the missing parts are sent.

    Example: deltactl push math.bdelta acme/math --tag prod

    Example: deltactl push math.bdelta acme/math --base org/llama --base-path ./llama-base
    """
    bars = _Bars()
    with _api(registry) as api:
        try:
            result = api.push(
                file,
                repo,
                base=base,
                base_path=base_path,
                tags=tag or [],
                description=description,
                visibility="private" if private else "public",
                progress=bars,
            )
        finally:
            bars.stop()
    if as_json:
        emit_json(_push_json(result))
        return
    v = result.version
    where = f"{v.repository}@{v.number}"
    if result.already_published:
        _line(
            f"{where}: published by an earlier run of this push "
            f"whose answer was lost, nothing uploaded — {v.digest}"
        )
    elif result.completed_earlier_upload:
        _line(
            f"pushed {where}: an interrupted earlier run had sent every byte; published them now — {v.digest}"
        )
    elif result.deduplicated:
        _line(f"{where}: identical bytes already in the registry, nothing uploaded (dedup) — {v.digest}")
    else:
        resumed = f", resumed: {result.skipped_parts} part(s) were already stored" if result.resumed else ""
        _line(
            f"pushed {where}: {human_bytes(result.sent_bytes)} "
            f"sent in {result.seconds:.1f}s{resumed} — {v.digest}"
        )
    tags = ", ".join(t for t in v.tags) or "-"
    _line(
        f"    codec {v.codec}, {human_bytes(v.size)} stored ({human_bytes(v.raw_size)} delta), "
        f"ratio {_ratio(v.size_ratio)}, tags {tags}, fidelity {fidelity_summary(v.fidelity)}"
    )


def _push_json(result: PushResult) -> dict:
    v = result.version
    return {
        "repository": v.repository,
        "version": v.number,
        "digest": v.digest,
        "raw_digest": v.raw_digest,
        "size": v.size,
        "raw_size": v.raw_size,
        "codec": v.codec,
        "tags": v.tags,
        "fidelity": v.fidelity,
        "deduplicated": result.deduplicated,
        "already_published": result.already_published,
        "completed_earlier_upload": result.completed_earlier_upload,
        "sent_bytes": result.sent_bytes,
        "resumed": result.resumed,
        "skipped_parts": result.skipped_parts,
        "created_repository": result.created_repo,
        "seconds": round(result.seconds, 3),
    }


@handle_errors
def pull_cmd(
    ref: Annotated[
        str,
        typer.Argument(metavar="REF", help="namespace/name, namespace/name:TAG or namespace/name@VERSION."),
    ],
    output: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--output",
            help="Also copy the delta to this file (or into this directory; a trailing slash makes one).",
        ),
    ] = None,
    registry: Registry = None,
    as_json: Json = False,
) -> None:
    """Download a delta into the cache and print its local path.

    The bytes are verified and decompressed as they arrive; a partial download resumes with
    Range. A delta already in the cache is not downloaded again.

    Example: deltactl pull acme/math:prod

    Example: deltactl pull acme/math@3 -o math.bdelta
    """
    bars = _Bars()
    with _api(registry) as api:
        try:
            result = api.pull(parse_ref(ref), output=output, progress=bars)
        finally:
            bars.stop()
    if as_json:
        emit_json(_pull_json(result))
        return
    v = result.version
    how = (
        "cache hit, nothing downloaded"
        if result.cache_hit
        else f"downloaded {human_bytes(result.downloaded_bytes)} in {result.seconds:.1f}s"
    )
    if result.repaired:
        how = "cached copy failed its digest check; " + how
    if result.offline:
        how += " (without the registry: offline, or it could not be reached)"
    _note(f"{v.repository}@{v.number} ({v.codec}, {human_bytes(v.raw_size)}): {how}")
    typer.echo(str(result.path))


def _pull_json(result: PullResult) -> dict:
    v = result.version
    return {
        "repository": v.repository,
        "version": v.number,
        "tags": v.tags,
        "digest": v.digest,
        "raw_digest": v.raw_digest,
        "raw_size": v.raw_size,
        "codec": v.codec,
        "path": str(result.path),
        "blob": str(result.blob),
        "cache_hit": result.cache_hit,
        "repaired": result.repaired,
        "offline": result.offline,
        "downloaded_bytes": result.downloaded_bytes,
        "seconds": round(result.seconds, 3),
    }


# --- browse --------------------------------------------------------------------------------------
@handle_errors
def list_cmd(
    base: Annotated[str | None, typer.Option("--base", help="Only repositories of this base model.")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", help="Only this namespace.")] = None,
    search: Annotated[
        str | None, typer.Option("--search", "-s", help="Substring of namespace or name.")
    ] = None,
    registry: Registry = None,
    as_json: Json = False,
) -> None:
    """List delta repositories with their latest version.

    Example: deltactl list --base meta-llama/Llama-3.1-8B
    """
    with _api(registry) as api:
        repos = api.repos(base=base, namespace=namespace, query=search)
    if as_json:
        emit_json([r.as_dict() for r in repos])
        return
    if not repos:
        _note("no repositories" + (f" of base {base}" if base else ""))
        return
    table = Table("repository", "base", "codec", "latest", "size", "ratio", "updated")
    for r in repos:
        latest = r.latest
        table.add_row(
            r.full_name,
            r.base,
            (latest.codec or "-") if latest else "-",
            f"v{latest.number}" if latest else "-",
            human_bytes(latest.size) if latest else "-",
            _ratio(latest.size_ratio) if latest else "-",
            _when(latest.ready_at if latest else r.created_at),
        )
    out.print(table)


@handle_errors
def show_cmd(
    ref: Annotated[
        str,
        typer.Argument(metavar="REF", help="namespace/name, or a version of it (:TAG, @VERSION) to detail."),
    ],
    registry: Registry = None,
    as_json: Json = False,
) -> None:
    """Show a repository's versions, tags, sizes, codecs and fidelity.

    With :TAG or @VERSION that version is detailed, otherwise the newest.

    Example: deltactl show acme/math:prod
    """
    parsed = parse_ref(ref)
    with _api(registry) as api:
        repo = api.repo(parsed.repo)
        versions = api.versions(parsed.repo)
        tags = api.tags(parsed.repo)
        selected = api.version(parsed) if parsed.explicit else (versions[0] if versions else None)
    if as_json:
        emit_json(
            {
                "repository": repo.as_dict(),
                "versions": [v.as_dict() for v in versions],
                "tags": [t.as_dict() for t in tags],
                "selected": selected.number if selected else None,
            }
        )
        return
    _print_repo(repo, len(versions))
    if not versions:
        _line("no versions yet")
        return
    table = Table("version", "tags", "codec", "size", "ratio", "fidelity", "created")
    for v in versions:
        table.add_row(
            f"v{v.number}",
            ", ".join(v.tags) or "-",
            v.codec or "-",
            human_bytes(v.size),
            _ratio(v.size_ratio),
            fidelity_summary(v.fidelity),
            _when(v.ready_at),
        )
    out.print(table)
    if selected is not None:
        _print_version(selected)


def _grid() -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")  # digests stay whole, wrapped
    return grid


def _print_repo(repo: RepoInfo, count: int) -> None:
    grid = _grid()
    for key, value in (
        ("repository", repo.full_name),
        ("base", f"{repo.base} ({repo.base_fingerprint})"),
        ("description", repo.description or "-"),
        ("visibility", repo.visibility),
        ("versions", str(count)),
        ("created", f"{_when(repo.created_at)} by {repo.created_by}"),
    ):
        grid.add_row(f"[bold]{key}", value)
    out.print(grid)


def _print_version(v: VersionInfo) -> None:
    grid = _grid()
    rows = [
        ("version", f"{v.repository}@{v.number}" + (f" ({', '.join(v.tags)})" if v.tags else "")),
        ("codec", f"{v.codec} ({v.dtype}, {v.bits or '-'} plane(s))"),
        ("digest", f"{v.digest} ({human_bytes(v.size)} stored)"),
        ("delta", f"{v.raw_digest} ({human_bytes(v.raw_size)})"),
    ]
    for key, value in sorted((v.fidelity or {}).items()):
        rows.append((f"fidelity.{key}", f"{value:.4g}" if isinstance(value, float) else str(value)))
    for key, value in sorted((v.calibration or {}).items()):
        rows.append((f"calibration.{key}", f"{value:.4g}" if isinstance(value, float) else str(value)))
    for key, value in rows:
        grid.add_row(f"[bold]{key}", value)
    out.print(grid)


# --- change ----------------------------------------------------------------------------------------
@handle_errors
def tag_cmd(
    ref: Annotated[
        str,
        typer.Argument(
            metavar="REF", help="The version to tag: namespace/name@VERSION, :TAG, or the latest."
        ),
    ],
    tag: Annotated[str, typer.Argument(help="Tag name (e.g. prod, v2).")],
    delete: Annotated[bool, typer.Option("--delete", help="Remove TAG from the repository instead.")] = False,
    registry: Registry = None,
    as_json: Json = False,
) -> None:
    """Point TAG at a version (creating or moving it), or remove it with --delete.

    Example: deltactl tag acme/math@3 prod
    """
    parsed = parse_ref(ref)
    with _api(registry) as api:
        if delete:
            api.delete_tag(parsed.repo, tag)
            result = {"repository": parsed.repo, "tag": tag, "deleted": True}
            message = f"removed tag {tag} from {parsed.repo}"
        else:
            number = parsed.version if parsed.version is not None else api.version(parsed).number
            info = api.set_tag(parsed.repo, tag, number)
            result = {"repository": parsed.repo, "tag": info.name, "version": info.version}
            message = f"{parsed.repo}:{info.name} -> version {info.version}"
    if as_json:
        emit_json(result)
    else:
        _line(message)


@handle_errors
def rm_cmd(
    ref: Annotated[
        str,
        typer.Argument(
            metavar="REF", help="namespace/name (the whole repository) or namespace/name@VERSION."
        ),
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    registry: Registry = None,
    as_json: Json = False,
) -> None:
    """Delete a version, or a whole repository with all its versions and tags.

    Example: deltactl rm acme/math@2

    Example: deltactl rm acme/old-experiment --yes
    """
    parsed = parse_ref(ref)
    if parsed.tag is not None:
        raise InvalidRequestError(
            f"delete a version by its number ({parsed.repo}@N), or remove "
            f"a tag with `deltactl tag {parsed.repo} {parsed.tag} --delete`"
        )
    with _api(registry) as api:
        if parsed.digest is not None:  # the version of that digest, never the whole repository
            parsed = Ref(parsed.namespace, parsed.name, version=api.version(parsed).number)
        if parsed.version is None:
            repo = api.repo(parsed.repo)
            what = (
                f"repository {repo.full_name} with all its versions "
                f"(latest v{repo.latest_version or 0}) and tags"
            )
        else:
            tags = [
                t for t in api.version(parsed).tags if t != "latest"
            ]  # fails with 'not found' before asking
            what = f"{parsed}" + (f" and its tag(s) {', '.join(tags)}" if tags else "")
        if not yes and not typer.confirm(f"Delete {what}?", default=False, err=True):
            exit_codes.fail("nothing deleted", exit_codes.EXIT_ERROR)
        removed: list[str] = []
        if parsed.version is None:
            api.delete_repo(parsed.repo)
        else:
            removed = api.delete_version(parsed.repo, parsed.version)
            what = f"{parsed}" + (f" and its tag(s) {', '.join(removed)}" if removed else "")
    if as_json:
        emit_json(
            {"deleted": str(parsed), **({"removed_tags": removed} if parsed.version is not None else {})}
        )
    else:
        _line(f"deleted {what}")


# --- bases -----------------------------------------------------------------------------------------
@base_app.command("add")
@handle_errors
def base_add_cmd(
    name: Annotated[str, typer.Argument(help="Registry name of the base, e.g. meta-llama/Llama-3.1-8B.")],
    path: Annotated[Path, typer.Argument(help="The local base checkpoint (HF directory or .safetensors).")],
    registry: Registry = None,
    as_json: Json = False,
) -> None:
    """Register a base model from a local checkpoint.

    Its weight fingerprint, architecture and parameter count are computed here. Registering
    the same base again is a no-op.

    Example: deltactl base add HuggingFaceTB/SmolLM2-135M-Instruct ./smollm2
    """
    with _api(registry) as api:
        with err.status(f"fingerprinting {path}") if err.is_terminal else contextlib.nullcontext():
            base, created = api.register_base_from_checkpoint(name, path)
    if as_json:
        emit_json({**base.as_dict(), "created": created})
        return
    params = f", {base.parameter_count / 1e6:.1f}M parameters" if base.parameter_count else ""
    verb = "registered" if created else "already registered:"
    _line(
        f"{verb} base {base.name} ({base.architecture or 'unknown architecture'}{params}) {base.fingerprint}"
    )


@base_app.command("ls")
@handle_errors
def base_ls_cmd(registry: Registry = None, as_json: Json = False) -> None:
    """List the registered base models.

    Example: deltactl base ls
    """
    with _api(registry) as api:
        bases = api.bases()
    if as_json:
        emit_json([{k: v for k, v in b.as_dict().items() if k != "config"} for b in bases])
        return
    if not bases:
        _note("no base models registered")
        return
    table = Table("base", "architecture", "parameters", "fingerprint", "registered")
    for b in bases:
        params = f"{b.parameter_count / 1e6:.1f}M" if b.parameter_count else "-"
        table.add_row(b.name, b.architecture or "-", params, b.fingerprint, _when(b.created_at))
    out.print(table)


@base_app.command("rm")
@handle_errors
def base_rm_cmd(
    name: Annotated[str, typer.Argument(help="Registry name of the base, e.g. meta-llama/Llama-3.1-8B.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    registry: Registry = None,
    as_json: Json = False,
) -> None:
    """Remove a registered base model (registered by mistake); refused while a repository uses it.

    Example: deltactl base rm org/wrong-base
    """
    with _api(registry) as api:
        base = api.base(name)  # fails with 'not found' before asking
        if not yes and not typer.confirm(
            f"Remove base {base.name} ({base.fingerprint})?", default=False, err=True
        ):
            exit_codes.fail("nothing removed", exit_codes.EXIT_ERROR)
        api.delete_base(base.name)
    if as_json:
        emit_json({"deleted": base.name, "fingerprint": base.fingerprint})
    else:
        _line(f"removed base {base.name} ({base.fingerprint})")


def register(app: typer.Typer) -> None:
    app.command("login")(login_cmd)
    app.command("logout")(logout_cmd)
    app.command("whoami")(whoami_cmd)
    app.command("push")(push_cmd)
    app.command("pull")(pull_cmd)
    app.command("list")(list_cmd)
    app.command("show")(show_cmd)
    app.command("tag")(tag_cmd)
    app.command("rm")(rm_cmd)
    app.add_typer(base_app, name="base")
