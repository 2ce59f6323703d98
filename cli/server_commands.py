"""`deltactl serve`, `deltactl db upgrade|current` and `deltactl gc`: running the registry.
The registry server modules are imported inside the commands, so other commands never load them."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Annotated

import typer

from . import errors as exit_codes
from .console import emit_json, err, out
from .errors import fail, handle_errors

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Registry data directory (embedded SQLite database and blobs). Env: DELTASTORE_DATA_DIR.",
    ),
]

db_app = typer.Typer(help="Registry database schema (migrations).", no_args_is_help=True)


#: Settings whose value an error message must not repeat (secrets, URLs that may hold a password).
_UNQUOTED_SETTINGS = {"admin_token", "database_url", "blob_url", "s3_endpoint_url"}


def _settings(data_dir: Path | None):
    """The registry's settings, or one `error: invalid configuration: …` line naming each bad
    variable (exit 7) instead of pydantic's report."""
    from pydantic import ValidationError

    from registry.server.settings import Settings

    try:
        return Settings(data_dir=data_dir) if data_dir is not None else Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            from_option = field == "data_dir" and data_dir is not None
            where = "--data-dir" if from_option else f"DELTASTORE_{field.upper()}"
            value = "" if field in _UNQUOTED_SETTINGS else f"={str(error.get('input'))[:60]!r}"
            problems.append(f"{where}{value}: {error['msg']}")
        fail("invalid configuration: " + "; ".join(problems), exit_codes.EXIT_INVALID)


def _engine(settings):
    from sqlalchemy.exc import ArgumentError

    from registry.server.db import create_db_engine

    try:
        return create_db_engine(settings.resolved_database_url)
    except ArgumentError as exc:  # unparsable URL, unknown dialect or driver
        fail(f"invalid configuration: DELTASTORE_DATABASE_URL: {exc}", exit_codes.EXIT_INVALID)


def _check_database(engine, settings) -> None:
    """Migrate the embedded default, then refuse a schema not at head; a database that cannot be
    reached is one line (exit 6), not the driver's traceback."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    from registry.server import migrate

    try:
        if settings.embedded:
            migrate.upgrade(engine)
        migrate.check_schema(engine)
    except (OperationalError, InterfaceError) as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        fail(f"database unavailable: cannot use {_shown(engine)}: {reason}", exit_codes.EXIT_NETWORK)
    finally:
        engine.dispose()


def _listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before the app starts, so an address that is taken
    or not this machine's is one line (exit 6) rather than uvicorn's log and exit 3."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        fail(f"cannot listen: {host}:{port}: {exc.strerror or exc}", exit_codes.EXIT_NETWORK)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        kind = "address in use" if exc.errno == errno.EADDRINUSE else "cannot listen"
        fail(f"{kind}: {host}:{port}: {exc.strerror or exc}", exit_codes.EXIT_NETWORK)
    return sock


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
    if not 0 < port < 65536:
        fail(f"invalid option: --port {port} is not a TCP port (1 to 65535)", exit_codes.EXIT_USAGE)
    settings = _settings(data_dir)
    engine = _engine(settings)
    _check_database(engine, settings)

    import uvicorn

    from registry.common.errors import InvalidRequestError
    from registry.server.app import create_app
    from registry.server.blobstores import open_blob_store

    try:
        open_blob_store(settings)  # refused here rather than in the app's start-up
    except InvalidRequestError as exc:
        fail(f"invalid configuration: DELTASTORE_BLOB_URL: {exc}", exit_codes.EXIT_INVALID)
    sock = _listen(host, port)
    err.print(
        f"deltastore registry on http://{host}:{port} "
        f"(database {_shown(engine)}, blobs {settings.resolved_blob_url})"
    )
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="info"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:  # the app's start-up failed: uvicorn logged why
        fail("start-up failed: the registry did not start (its log above says why)", exit_codes.EXIT_ERROR)


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
        report = collect_garbage(
            db=db, store=open_blob_store(settings), settings=settings, actor="deltactl gc", dry_run=dry_run
        )
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
    digests: Annotated[
        bool,
        typer.Option(
            "--digests/--no-digests", help="Re-read every blob and verify its digests (slow on large stores)."
        ),
    ] = True,
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
            f"{report.versions} version(s), {report.blobs} blob(s), "
            f"{report.objects} stored object(s){verified}: "
            + ("consistent" if report.ok else "INCONSISTENT")
            + f"; problems: {report.missing_objects} missing object(s), "
            f"{report.digest_mismatches} digest mismatch(es), "
            f"{report.dangling_versions} dangling version(s), {report.number_errors} "
            f"numbering error(s), {report.tag_errors} tag error(s)"
            f"; leftovers for gc: {report.orphan_objects} orphan "
            f"object(s), {report.staging_leftovers} staging leftover(s), "
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
