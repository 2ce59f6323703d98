"""End to end, as a user runs it: `deltactl serve` in its own process on the embedded default,
and the `deltactl` executable pushing and pulling against it; then the demo's registry part on
the tiny pair."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from cli.demo import background_registry, registry_round_trip
from codec.compress import CompressOptions, compress

BASE = "org/tiny-llama"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTACTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DELTACTL_REGISTRY", raising=False)
    monkeypatch.delenv("DELTACTL_TOKEN", raising=False)


@pytest.fixture(scope="module")
def delta(llama_pair, tmp_path_factory):
    path = tmp_path_factory.mktemp("e2e") / "math.bdelta"
    compress(*llama_pair, path, CompressOptions(base_name=BASE))
    return path


def deltactl(*args, env: dict) -> subprocess.CompletedProcess:
    exe = shutil.which("deltactl", path=os.path.dirname(sys.executable)) or "deltactl"
    return subprocess.run([exe, *map(str, args)], env=env, capture_output=True, text=True, timeout=120)


def test_the_deltactl_executable_against_deltactl_serve(tmp_path, llama_pair, delta):
    with background_registry(tmp_path / "registry", tmp_path / "serve.log") as url:
        env = {**os.environ, "DELTACTL_REGISTRY": url, "DELTACTL_HOME": str(tmp_path / "home")}
        r = deltactl(
            "push", delta, "acme/math", "--base-path", llama_pair[0], "--tag", "prod", "--json", env=env
        )
        assert r.returncode == 0, r.stderr
        pushed = json.loads(r.stdout)
        r = deltactl("pull", "acme/math:prod", env={**env, "DELTACTL_HOME": str(tmp_path / "fresh")})
        assert r.returncode == 0, r.stderr
        assert open(r.stdout.strip(), "rb").read() == delta.read_bytes()
        assert f"acme/math@{pushed['version']}" in r.stderr and "downloaded" in r.stderr
        r = deltactl("pull", "acme/nothing", env=env)
        assert r.returncode == 3 and r.stderr == "error: not found: repository acme/nothing does not exist\n"
    r = deltactl("list", env=env)
    assert r.returncode == 6 and r.stderr.startswith(f"error: network: cannot reach the registry at {url}")


def test_the_demos_registry_part(tmp_path, llama_pair, delta):
    figures = registry_round_trip(tmp_path, llama_pair[0], delta, base_name=BASE, repo="demo/tiny")
    assert figures["identical"] and figures["dedup"] and figures["cache_hit"]
    assert figures["delta_bytes"] == delta.stat().st_size and figures["loaded_tensors"] > 0
    assert (tmp_path / "pull-home" / "blobs").is_dir() and not (tmp_path / "pull-home" / "uploads").exists()
