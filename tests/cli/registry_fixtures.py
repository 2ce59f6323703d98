"""Fixtures of the registry CLI tests: real deltas of the tiny Llama pair, the real registry app
under uvicorn on 127.0.0.1 (SQLite, local blobs or moto's S3 server), and `deltactl` through
Typer's CliRunner. Test modules import what they use from here."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from codec.compress import BitDeltaOptions, CompressOptions, DeltaDQOptions, compress
from registry.server.settings import Settings
from tests.support.live_registry import (  # importing it sets the AWS and moto test environment
    LiveServer,
    moto_s3,
    new_bucket,
    start_live_registry,
    xdist_worker,
)
from tests.support.live_registry import s3_client as _s3_client

BASE = "org/tiny-llama"
FIDELITY = {"gain_recovered": 0.91, "greedy_agreement": 0.75, "loss": 2.25}
CALIBRATION = {"dataset": "stdlib", "steps": 20, "final_loss": 0.125}

runner = CliRunner()


def deltactl(*args, input: str | None = None, env: dict | None = None):
    """Run `deltactl ARGS` in-process; stdout and stderr are kept apart."""
    return runner.invoke(app, [str(a) for a in args], input=input, env=env)


def deltactl_json(*args):
    result = deltactl(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@dataclass(frozen=True)
class Deltas:
    base_dir: Path
    plain: Path  # bitdelta
    other: Path  # bitdelta, other bytes
    with_fidelity: Path  # carries fidelity and calibration metadata
    deltadq: Path
    foreign: Path  # made against another base


@pytest.fixture(scope="session")
def deltas(llama_pair, llama_pair_fp16_tied, tmp_path_factory) -> Deltas:
    base_dir, ft_dir = llama_pair
    out = tmp_path_factory.mktemp("cli-deltas")
    opts = CompressOptions(base_name=BASE)
    compress(base_dir, ft_dir, out / "plain.bdelta", opts)
    compress(
        base_dir,
        ft_dir,
        out / "other.bdelta",
        CompressOptions(codec=BitDeltaOptions(scale_mode="per-row"), base_name=BASE),
    )
    compress(
        base_dir,
        ft_dir,
        out / "fid.bdelta",
        opts,
        extra_metadata={"fidelity": json.dumps(FIDELITY), "calibration": json.dumps(CALIBRATION)},
    )
    compress(
        base_dir,
        ft_dir,
        out / "dq.bdelta",
        CompressOptions(codec=DeltaDQOptions(bits=1, keep=0.5), base_name=BASE),
    )
    compress(*llama_pair_fp16_tied, out / "foreign.bdelta", CompressOptions(base_name=BASE))
    return Deltas(
        base_dir,
        out / "plain.bdelta",
        out / "other.bdelta",
        out / "fid.bdelta",
        out / "dq.bdelta",
        out / "foreign.bdelta",
    )


@pytest.fixture
def start_registry(tmp_path, monkeypatch) -> Iterator[Callable[..., LiveServer]]:
    """Start the real registry app under uvicorn on loopback with settings overrides (SQLite
    database under tmp_path); DELTACTL_REGISTRY points at the last one started."""
    servers: list[LiveServer] = []

    def start(**overrides) -> LiveServer:
        data_dir = tmp_path / f"registry-{len(servers)}"
        settings = Settings(data_dir=data_dir, database_url=f"sqlite:///{data_dir}/registry.db", **overrides)
        server = start_live_registry(settings, migrate_first=True)
        servers.append(server)
        monkeypatch.setenv("DELTACTL_REGISTRY", server.url)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def registry(start_registry) -> LiveServer:
    """The embedded default: SQLite + local blob store, auth off."""
    return start_registry()


@pytest.fixture
def with_base(registry, deltas) -> str:
    result = deltactl("base", "add", BASE, deltas.base_dir)
    assert result.exit_code == 0, result.output
    return BASE


# --- S3 --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3_client(s3_endpoint):
    return _s3_client(s3_endpoint)


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    return new_bucket(s3_endpoint, f"cli-{xdist_worker()}")
