"""Registry test fixtures: real deltas, real SQLite and PostgreSQL databases, a real S3 endpoint
(moto's HTTP server on loopback), the real app over HTTP."""

from __future__ import annotations

import os

# moto reads its minimum multipart part size at import: tests use tiny parts to get several.
os.environ.setdefault("S3_UPLOAD_PART_MIN_SIZE", "1024")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Iterator  # noqa: E402

import pytest  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from registry.app import create_app  # noqa: E402
from registry.db import Database  # noqa: E402
from registry.schema import upgrade  # noqa: E402
from registry.settings import Settings  # noqa: E402

from .helpers import DeltaBlob, LiveServer, make_delta_blobs  # noqa: E402

PG_URL_ENV = "DELTASTORE_TEST_PG_URL"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


# --- deltas ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def delta_blobs(llama_pair, tmp_path_factory) -> list[DeltaBlob]:
    """Eight distinct real deltas of the same base (zstd storage form + their declared digests)."""
    return make_delta_blobs(*llama_pair, tmp_path_factory.mktemp("deltas"), count=8)


@pytest.fixture(scope="session")
def base_fingerprint(delta_blobs) -> str:
    return delta_blobs[0].base_fingerprint


# --- databases -------------------------------------------------------------------------------
def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture
def database_url(request, tmp_path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a uniquely named PostgreSQL database."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    admin_url = os.environ.get(PG_URL_ENV)
    if not admin_url:
        pytest.skip(f"PostgreSQL tests need {PG_URL_ENV} (set by .ci/run, which starts a throwaway PostgreSQL 15)")
    name = f"ds_{_worker()}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def migrated_url(database_url) -> str:
    db = Database.from_url(database_url)
    upgrade(db.engine)
    db.dispose()
    return database_url


# --- S3 --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    import moto.s3.models
    from moto.server import ThreadedMotoServer

    moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = 1024  # in case moto was imported before the env var was set
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    import boto3

    name = f"ds-{_worker().replace('gw', 'w')}-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_client(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


# --- the app ---------------------------------------------------------------------------------
@pytest.fixture
def make_settings(tmp_path, migrated_url) -> Callable[..., Settings]:
    def make(**overrides) -> Settings:
        return Settings(data_dir=tmp_path / "data", database_url=migrated_url, **overrides)

    return make


@pytest.fixture
def make_client(make_settings) -> Iterator[Callable[..., TestClient]]:
    """Start the real app (lifespan included) with settings overrides; closed after the test."""
    clients: list[TestClient] = []

    def make(**overrides) -> TestClient:
        client = TestClient(create_app(make_settings(**overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


@pytest.fixture
def live_server(make_settings) -> Iterator[Callable[..., LiveServer]]:
    """The real app under uvicorn on 127.0.0.1 (a free port)."""
    servers: list[LiveServer] = []

    def start(**overrides) -> LiveServer:
        server = LiveServer(create_app(make_settings(**overrides)))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def data_dir(make_settings) -> Path:
    return make_settings().data_dir
