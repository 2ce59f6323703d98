"""`deltactl serve-model` as a user runs it: a child process serving the OpenAI API on a free
loopback port, and start-up refusals as one `error: <kind>: <message>` line with the table's code."""

from __future__ import annotations

import os
import subprocess

import httpx
from typer.testing import CliRunner

from cli.errors import EXIT_BASE_MISMATCH, EXIT_NETWORK
from cli.main import app
from tests.gpu_loader.serving.conftest import BASE_NAME, REPOS, serve_model_argv, wait_until_ready
from tests.support.harness import free_port

runner = CliRunner()


def test_refuses_a_registry_that_does_not_know_the_base(world, registry, tmp_path, monkeypatch):
    monkeypatch.setenv("DELTACTL_HOME", str(tmp_path / "home"))
    from codec.checkpoint import Checkpoint

    other_fp = Checkpoint.open(world.other_base).fingerprint()
    result = runner.invoke(app, ["serve-model", str(world.root / "ft2"), "--registry", registry.url])
    assert result.exit_code == EXIT_BASE_MISMATCH, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: base mismatch: ")
    ours = Checkpoint.open(world.root / "ft2").fingerprint()
    assert ours in lines[0] and other_fp in lines[0] and "test/other-llama" in lines[0]


def test_refuses_an_unreachable_registry(world, tmp_path, monkeypatch):
    monkeypatch.setenv("DELTACTL_HOME", str(tmp_path / "home"))
    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["serve-model", str(world.base), "--registry", url])
    assert result.exit_code == EXIT_NETWORK, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and url in lines[0]


def test_serves_the_registry_deltas_over_http(world, registry, tmp_path):
    port = free_port()
    env = {**os.environ, "DELTACTL_HOME": str(tmp_path / "home")}
    cmd = serve_model_argv(world.base, registry.url, port)
    log = tmp_path / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(proc, url, log, timeout=120)
        headers = {"Authorization": "Bearer k"}
        models = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()
        assert models["data"][0]["id"] == BASE_NAME  # the registry's name for this base
        body = {"model": REPOS["d1"], "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == world.reference("d1", [5, 6, 7], 6)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
