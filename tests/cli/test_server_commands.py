"""`deltactl serve` on the embedded default migrates and serves; `deltactl gc` collects."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
from typer.testing import CliRunner

from cli.main import app as cli_app

from tests.registry.conftest import base_fingerprint, delta_blobs  # noqa: F401  (fixtures)
from tests.registry.helpers import push, setup_repo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_embedded_default_then_gc(tmp_path, delta_blobs, base_fingerprint):
    data_dir = tmp_path / "registry"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTASTORE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--data-dir", str(data_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "deltactl serve did not become ready"
            time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=30) as c:
            setup_repo(c, base_fingerprint)
            assert push(c, delta_blobs[0]).status_code == 201
            assert push(c, delta_blobs[1]).status_code == 201
            assert c.delete("/v1/repos/acme/math/versions/1").status_code == 204
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert (data_dir / "registry.db").is_file()

    runner = CliRunner()
    env = {"DELTASTORE_GC_GRACE_SECONDS": "0"}
    dry = runner.invoke(cli_app, ["gc", "--dry-run", "--json", "--data-dir", str(data_dir)], env=env)
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["blobs"] == 1 and json.loads(dry.output)["dry_run"] is True
    real = runner.invoke(cli_app, ["gc", "--data-dir", str(data_dir)], env=env)
    assert real.exit_code == 0 and "removed 1 unreferenced blob(s)" in real.output
    blobs = [p for p in (data_dir / "blobs" / "sha256").rglob("*") if p.is_file()]
    assert [p.name for p in blobs] == [delta_blobs[1].digest.removeprefix("sha256:")]
