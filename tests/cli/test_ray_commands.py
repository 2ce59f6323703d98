"""`deltactl serve-model BASE --ray` as a user runs it: the same start-up refusals as the single-node
command before Ray starts, and a child process serving the OpenAI API on Ray Serve that stops (Ray
with it) on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest
from typer.testing import CliRunner

from cli.errors import EXIT_BASE_MISMATCH
from cli.main import app
from tests.gpu_loader.serving.conftest import (  # noqa: F401  (fixtures)
    BASE_NAME,
    REPOS,
    registry,
    serve_model_argv,
    wait_until_ready,
    world,
)
from tests.support.harness import free_port

pytest.importorskip("ray")
runner = CliRunner()


def test_refuses_a_registry_that_does_not_know_the_base_before_starting_ray(world, registry):  # noqa: F811
    from codec.checkpoint import Checkpoint

    t0 = time.monotonic()
    result = runner.invoke(app, ["serve-model", str(world.root / "ft2"), "--registry", registry.url, "--ray"])
    assert result.exit_code == EXIT_BASE_MISMATCH, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: base mismatch: ")
    assert Checkpoint.open(world.root / "ft2").fingerprint() in lines[0]
    assert time.monotonic() - t0 < 10, "refused after starting Ray rather than before"


@pytest.mark.ray
def test_serves_on_ray_and_stops_on_ctrl_c(world, registry, tmp_path):  # noqa: F811
    port = free_port()
    env = {**os.environ, "DELTACTL_HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)
    cmd = serve_model_argv(world.base, registry.url, port, "--ray", "--replicas", "1")
    log = tmp_path / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(proc, url, log, timeout=240)
        headers = {"Authorization": "Bearer k"}
        models = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()
        assert models["data"][0]["id"] == BASE_NAME  # the registry's name for this base
        body = {"model": REPOS["d1"], "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == world.reference("d1", [5, 6, 7], 6)
        assert r.headers["x-deltastore-replica"].startswith("SERVE_REPLICA::deltastore#DeltaReplica#")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
        assert "stopping" in log.read_text()
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/readyz", timeout=2)
    finally:
        if proc.poll() is None:  # the command and the Ray processes it started, all in its session
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
