"""Starting a real registry for tests and benchmarks, in one place: a fresh database (a SQLite
file, or a uniquely named PostgreSQL database dropped afterwards), migrated to the schema head;
moto's S3 server or s3rver (a second, independently written S3 server: npm's `s3rver`, installed
by .ci/s3rver.sh) on loopback; the app under uvicorn in a background thread.

    with fresh_database("postgres", admin_url=pg, sqlite_dir=tmp) as url:
        server = start_live_registry(Settings(data_dir=tmp / "data", database_url=url))
        ...
        server.stop()

Importing this module sets the test defaults of the AWS and moto environment (fake credentials that
both servers accept, moto's 1 KiB minimum multipart part size, which moto reads at import), unless
already set.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

# moto reads its minimum multipart part size at import: tests use tiny parts to get several.
os.environ.setdefault("S3_UPLOAD_PART_MIN_SIZE", "1024")
# s3rver knows one key pair (S3RVER/S3RVER) and refuses any other access key; moto takes any.
S3RVER_KEY = "S3RVER"
os.environ.setdefault("AWS_ACCESS_KEY_ID", S3RVER_KEY)
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", S3RVER_KEY)
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import httpx  # noqa: E402
import uvicorn  # noqa: E402

if TYPE_CHECKING:
    from registry.server.settings import Settings

#: The s3rver executable (npm package `s3rver`); by default the one .ci/s3rver.sh installs under
#: S3RVER_PREFIX, else `s3rver` on PATH.
S3RVER_ENV = "DELTASTORE_S3RVER"
S3RVER_PREFIX = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deltastore" / "s3rver"

#: Where the PostgreSQL tests find a server to create their databases on (set by
#: .ci/with-postgres.sh, which `make test` runs under).
PG_URL_ENV = "DELTASTORE_TEST_PG_URL"


# --- databases -------------------------------------------------------------------------------
@contextlib.contextmanager
def fresh_database(
    backend: str, *, sqlite_dir: str | os.PathLike[str], admin_url: str | None = None, prefix: str = "ds"
) -> Iterator[str]:
    """The URL of a new, empty database: `sqlite_dir`/registry.db, or on the PostgreSQL server of
    `admin_url` a database named `<prefix>_<random>`, dropped (connections and all) on exit."""
    if backend == "sqlite":
        yield f"sqlite:///{Path(sqlite_dir) / 'registry.db'}"
        return
    if backend != "postgres" or not admin_url:
        raise ValueError(f"no database for backend {backend!r} (PostgreSQL needs an admin URL)")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def migrate(database_url: str) -> str:
    """Bring the database at `database_url` to the migrations' head; returns the URL."""
    from registry.server.db import Database
    from registry.server.migrate import upgrade

    db = Database.from_url(database_url)
    try:
        upgrade(db.engine)
    finally:
        db.dispose()
    return database_url


# --- S3 --------------------------------------------------------------------------------------
@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on a free loopback port; yields its endpoint URL."""
    import moto.s3.models
    from moto.server import ThreadedMotoServer

    moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = 1024  # in case moto was imported before the variable was set
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3rver_executable() -> str | None:
    """The s3rver to run ($DELTASTORE_S3RVER, the .ci/s3rver.sh install, or PATH), None if none."""
    if explicit := os.environ.get(S3RVER_ENV):
        return explicit
    installed = S3RVER_PREFIX / "node_modules" / ".bin" / "s3rver"
    return str(installed) if installed.exists() else shutil.which("s3rver")


@contextlib.contextmanager
def s3rver_s3() -> Iterator[str]:
    """s3rver on a free loopback port, storing into a temporary directory removed afterwards;
    yields its endpoint URL. Raises RuntimeError when s3rver is not installed or will not start."""
    executable = s3rver_executable()
    if executable is None:
        raise RuntimeError(f"s3rver is not installed (bash .ci/s3rver.sh, or set {S3RVER_ENV})")
    if os.environ.get("AWS_ACCESS_KEY_ID") != S3RVER_KEY:
        raise RuntimeError(f"s3rver accepts only the access key {S3RVER_KEY}; AWS_ACCESS_KEY_ID is another")
    with tempfile.TemporaryDirectory(prefix="ds-s3rver-") as directory, tempfile.TemporaryFile() as log:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(
            [executable, "--directory", directory, "--address", "127.0.0.1", "--port", str(port), "--silent"],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        endpoint = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(endpoint, timeout=1)
                    break
                except httpx.HTTPError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        proc.kill()
                        proc.wait()
                        log.seek(0)
                        raise RuntimeError(f"s3rver did not start: {log.read().decode()[-500:]}") from None
                    time.sleep(0.05)
            yield endpoint
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def new_bucket(endpoint: str, prefix: str) -> str:
    """Create a bucket named `<prefix>-<random>` on `endpoint`; returns its name."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def xdist_worker() -> str:
    """The pytest-xdist worker running this test ('main' without xdist), to keep names apart."""
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


# --- the app under uvicorn -------------------------------------------------------------------
class LiveServer:
    """uvicorn serving an app on 127.0.0.1 in a background thread."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)


def start_live_registry(settings: Settings, *, migrate_first: bool = False) -> LiveServer:
    """The real registry app (`registry.app.create_app(settings)`) under uvicorn on loopback,
    started; with `migrate_first`, its database is brought to the schema head before."""
    from registry.server.app import create_app

    if migrate_first:
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        migrate(settings.resolved_database_url)
    server = LiveServer(create_app(settings))
    server.start()
    return server
