"""Registry test fixtures: real deltas, real SQLite and PostgreSQL databases, a real S3 endpoint
(moto's HTTP server on loopback, or s3rver where a test is parametrized over S3_SERVERS), the real
app over HTTP."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from registry.server.app import create_app
from registry.server.settings import Settings
from tests.support.live_registry import (  # importing it sets the AWS and moto test environment
    PG_URL_ENV,
    LiveServer,
    fresh_database,
    migrate,
    moto_s3,
    new_bucket,
    s3rver_executable,
    s3rver_s3,
    start_live_registry,
    xdist_worker,
)
from tests.support.live_registry import s3_client as _s3_client

from .helpers import DeltaBlob, make_delta_blobs

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
#: Two independently written S3 servers, for `@pytest.mark.parametrize("s3_endpoint", S3_SERVERS,
#: indirect=True)`; s3rver lacks AbortMultipartUpload and ListMultipartUploads (bench/s3_features.py),
#: so gc's cleanup of abandoned multipart uploads is tested on moto alone.
S3_SERVERS = ["moto", "s3rver"]


# --- deltas ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def delta_blobs(llama_pair, tmp_path_factory) -> list[DeltaBlob]:
    """Eight distinct real deltas of the same base (zstd storage form + their declared digests)."""
    return make_delta_blobs(*llama_pair, tmp_path_factory.mktemp("deltas"), count=8)


@pytest.fixture(scope="session")
def base_fingerprint(delta_blobs) -> str:
    return delta_blobs[0].base_fingerprint


# --- databases -------------------------------------------------------------------------------
@pytest.fixture
def database_url(request, tmp_path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a uniquely named PostgreSQL database."""
    backend = getattr(request, "param", "sqlite")
    admin_url = os.environ.get(PG_URL_ENV)
    if backend == "postgres" and not admin_url:
        pytest.skip(
            f"PostgreSQL tests need {PG_URL_ENV} (`make test` sets it: "
            ".ci/with-postgres.sh starts a throwaway PostgreSQL 15)"
        )
    with fresh_database(
        backend, sqlite_dir=tmp_path, admin_url=admin_url, prefix=f"ds_{xdist_worker()}"
    ) as url:
        yield url


@pytest.fixture
def migrated_url(database_url) -> str:
    return migrate(database_url)


# --- S3 --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_endpoint(request) -> Iterator[str]:
    """The endpoint URL of an S3 server on loopback: moto's, or s3rver's when parametrized so."""
    server = getattr(request, "param", "moto")
    if server == "s3rver":
        if s3rver_executable() is None:
            pytest.skip("s3rver is not installed (bash .ci/s3rver.sh installs it with npm)")
        with s3rver_s3() as endpoint:
            yield endpoint
    else:
        with moto_s3() as endpoint:
            yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    return new_bucket(s3_endpoint, f"ds-{xdist_worker().replace('gw', 'w')}")


@pytest.fixture
def s3_client(s3_endpoint):
    return _s3_client(s3_endpoint)


#: The part size of the multipart push tests: tiny, so each test delta takes several parts.
TEST_PART = 64 << 10


@pytest.fixture
def s3_store(s3_endpoint, s3_bucket) -> dict:
    """Registry settings for an S3 store that takes every push but the tiniest in TEST_PART parts."""
    return {
        "blob_url": f"s3://{s3_bucket}/registry",
        "s3_endpoint_url": s3_endpoint,
        "multipart_threshold": 1024,
        "multipart_part_size": TEST_PART,
    }


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
        server = start_live_registry(make_settings(**overrides))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def data_dir(make_settings) -> Path:
    return make_settings().data_dir
