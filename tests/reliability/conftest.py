"""Reliability fixtures: the registry tests' databases, S3 endpoint and app fixtures, plus
registry processes that can be killed and a PostgreSQL cluster that can be restarted."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.registry.conftest import (  # noqa: F401  (fixtures re-exported for this package)
    BACKENDS,
    PG_URL_ENV,
    client,
    data_dir,
    database_url,
    live_server,
    make_client,
    make_settings,
    migrated_url,
    s3_bucket,
    s3_client,
    s3_endpoint,
)
from tests.support.harness import PostgresCluster, RegistryProcess, postgres_available


@pytest.fixture
def registry_process(tmp_path, migrated_url) -> Iterator[Callable[..., RegistryProcess]]:
    """Start the registry in its own process on `migrated_url` (data under tmp_path/data); every
    process started is killed at the end."""
    started: list[RegistryProcess] = []

    def start(**env) -> RegistryProcess:
        full = {
            "DELTASTORE_DATA_DIR": str(tmp_path / "data"),
            "DELTASTORE_DATABASE_URL": migrated_url,
            **{f"DELTASTORE_{k.upper()}": str(v) for k, v in env.items()},
        }
        server = RegistryProcess(full, log_path=tmp_path / f"registry-{len(started)}.log")
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()


@pytest.fixture(scope="session")
def _private_cluster() -> Iterator[PostgresCluster]:
    why = postgres_available()
    if why:
        pytest.skip(why)
    cluster = PostgresCluster().init()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_cluster(_private_cluster) -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster (one per test worker) that the test may stop and start, with a
    fresh database for the test at `.url`; it is running again after the test."""
    cluster = _private_cluster
    name = cluster.create_database()
    yield cluster.for_database(name)
    cluster.start_if_stopped()


@pytest.fixture
def settings_for(tmp_path) -> Callable:
    from registry.server.settings import Settings

    def make(url: str, **overrides) -> Settings:
        return Settings(data_dir=tmp_path / "data", database_url=url, **overrides)

    return make


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
