"""`deltactl serve`, `deltactl db upgrade|current` and `deltactl gc`: running the registry.
The registry server modules are imported inside the commands, so other commands never load them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .console import emit_json, err, out
from .errors import handle_errors

DataDir = Annotated[
    Optional[Path],
    typer.Option("--data-dir", help="Registry data directory (embedded SQLite database and blobs). Env: DELTASTORE_DATA_DIR."),
]

db_app = typer.Typer(help="Registry database schema (migrations).", no_args_is_help=True)


def _settings(data_dir: Optional[Path]):
    from registry.server.settings import Settings

    return Settings(data_dir=data_dir) if data_dir is not None else Settings()


def _engine(settings):
    from registry.server.db import create_db_engine

    return create_db_engine(settings.resolved_database_url)


def _shown(engine) -> str:
    return engine.url.render_as_string(hide_password=True)


@handle_errors
def serve_cmd(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    data_dir: DataDir = None,
) -> None:
    """Run the registry server (REST API under /v1, docs at /docs).

    With the embedded default (no DELTASTORE_DATABASE_URL) the database is migrated first; an
    external database must be migrated with `deltactl db upgrade`.

    Example: deltactl serve --port 8000 --data-dir ./registry-data
    """
    from registry.server import migrate

    settings = _settings(data_dir)
    engine = _engine(settings)
    try:
        if settings.embedded:
            migrate.upgrade(engine)
        migrate.check_schema(engine)
    finally:
        engine.dispose()

    import uvicorn

    from registry.server.app import create_app

    err.print(f"deltastore registry on http://{host}:{port} (database {_shown(engine)}, blobs {settings.resolved_blob_url})")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


@db_app.command("upgrade")
@handle_errors
def db_upgrade_cmd(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    data_dir: DataDir = None,
) -> None:
    """Apply the schema migrations to the registry database (DELTASTORE_DATABASE_URL).

    Example: DELTASTORE_DATABASE_URL=postgresql+psycopg://reg@db/registry deltactl db upgrade
    """
    from registry.server import migrate

    engine = _engine(_settings(data_dir))
    try:
        migrate.upgrade(engine, revision)
        out.print(f"{_shown(engine)}: at schema revision {migrate.current_revision(engine)}")
    finally:
        engine.dispose()


@db_app.command("current")
@handle_errors
def db_current_cmd(data_dir: DataDir = None) -> None:
    """Show the database's schema revision and the one this version needs."""
    from registry.server import migrate

    engine = _engine(_settings(data_dir))
    try:
        current = migrate.current_revision(engine)
        err.print(f"this deltastore needs schema revision {migrate.head_revision()}")
        typer.echo(f"{_shown(engine)}: {current or 'none'}")
    finally:
        engine.dispose()


@handle_errors
def gc_cmd(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would be removed.")] = False,
    data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Remove unreferenced blobs, stale pending uploads and store leftovers (run on the server host).

    Example: deltactl gc --dry-run
    """
    from registry.server import migrate
    from registry.server.blobstores import open_blob_store
    from registry.server.db import Database
    from registry.server.gc import collect_garbage

    settings = _settings(data_dir)
    db = Database.from_url(settings.resolved_database_url)
    try:
        migrate.check_schema(db.engine)
        report = collect_garbage(db=db, store=open_blob_store(settings), settings=settings, actor="deltactl gc", dry_run=dry_run)
    finally:
        db.dispose()
    if as_json:
        emit_json(report.as_dict())
        return
    verb = "would remove" if dry_run else "removed"
    out.print(
        f"{verb} {report.blobs} unreferenced blob(s), {report.stale_uploads} stale upload(s), "
        f"{report.staged_objects} staging leftover(s), {report.orphan_objects} orphan object(s)"
    )


@handle_errors
def fsck_cmd(
    digests: Annotated[bool, typer.Option("--digests/--no-digests", help="Re-read every blob and verify its digests (slow on large stores).")] = True,
    data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check that the registry database and the blob store agree (run on the server host).

    Reports blob rows whose object is missing, stored bytes that no longer match their digests,
    version/tag invariants, and leftovers that `deltactl gc` removes. Exit code 1 on any problem.

    Example: deltactl fsck --json
    """
    from registry.server import migrate
    from registry.server.blobstores import open_blob_store
    from registry.server.db import Database
    from registry.server.fsck import check_consistency

    settings = _settings(data_dir)
    db = Database.from_url(settings.resolved_database_url)
    try:
        migrate.check_schema(db.engine)
        report = check_consistency(db=db, store=open_blob_store(settings), settings=settings, digests=digests)
    finally:
        db.dispose()
    if as_json:
        emit_json(report.as_dict())
    else:
        for line in report.details:
            typer.echo(line, err=True)
        verified = f", {report.bytes_verified} bytes re-verified" if digests else " (digests not checked)"
        typer.echo(
            f"{report.versions} version(s), {report.blobs} blob(s), {report.objects} stored object(s){verified}: "
            + ("consistent" if report.ok else "INCONSISTENT")
            + f"; problems: {report.missing_objects} missing object(s), {report.digest_mismatches} digest mismatch(es), "
            f"{report.dangling_versions} dangling version(s), {report.number_errors} numbering error(s), {report.tag_errors} tag error(s)"
            f"; leftovers for gc: {report.orphan_objects} orphan object(s), {report.staging_leftovers} staging leftover(s), "
            f"{report.unreferenced_blobs} unreferenced blob(s), {report.stale_uploads} stale upload(s)"
            f"; {report.pending_uploads} upload(s) pending"
        )
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.command("gc")(gc_cmd)
    app.command("fsck")(fsck_cmd)
    app.add_typer(db_app, name="db")
