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
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
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
            assert c.delete("/v1/repos/acme/math/versions/1").status_code == 200
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


# --- start-up failures: one `error: <kind>: <message>` line and the README's exit code ------------------
def _serve(args: list[str], env: dict[str, str] | None = None):
    env = {**{k: None for k in os.environ if k.startswith("DELTASTORE_")}, **(env or {})}
    return CliRunner().invoke(cli_app, ["serve", *args], env=env)


def _one_error_line(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stdout == "", result.output
    return lines[0]


def test_serve_refuses_a_port_out_of_range(tmp_path):
    r = _serve(["--port", "80000", "--data-dir", str(tmp_path)])
    assert r.exit_code == 2
    assert _one_error_line(r) == "error: invalid option: --port 80000 is not a TCP port (1 to 65535)"


def test_serve_names_a_malformed_setting(tmp_path):
    bad = {"DELTASTORE_MAX_UPLOAD_BYTES": "12x", "DELTASTORE_S3_MAX_ATTEMPTS": "0"}
    r = _serve(["--data-dir", str(tmp_path)], bad)
    assert r.exit_code == 7
    assert _one_error_line(r) == (
        "error: invalid configuration: DELTASTORE_S3_MAX_ATTEMPTS='0': Input should be greater than or "
        "equal to 1; DELTASTORE_MAX_UPLOAD_BYTES='12x': Input should be a valid integer, unable to parse "
        "string as an integer"
    )


def test_serve_does_not_repeat_a_database_url_it_cannot_use(tmp_path):
    r = _serve(["--data-dir", str(tmp_path)], {"DELTASTORE_DATABASE_URL": "nosuchdialect://u:hunter2@db/x"})
    assert r.exit_code == 7
    line = _one_error_line(r)
    assert line.startswith("error: invalid configuration: DELTASTORE_DATABASE_URL: ")
    assert "hunter2" not in line


def test_serve_refuses_a_blob_url_of_another_scheme(tmp_path):
    r = _serve(["--data-dir", str(tmp_path)], {"DELTASTORE_BLOB_URL": "ftp://host/blobs"})
    assert r.exit_code == 7
    assert _one_error_line(r) == (
        "error: invalid configuration: DELTASTORE_BLOB_URL: blob URL 'ftp://host/blobs': "
        "scheme must be file:// or s3://"
    )


def test_serve_says_when_the_database_is_unreachable(tmp_path):
    port = _free_port()  # nothing listens there
    url = f"postgresql+psycopg://reg:hunter2@127.0.0.1:{port}/registry"
    r = _serve(["--data-dir", str(tmp_path)], {"DELTASTORE_DATABASE_URL": url})
    assert r.exit_code == 6
    line = _one_error_line(r)
    shown = f"postgresql+psycopg://reg:***@127.0.0.1:{port}/registry"
    assert line.startswith(f"error: database unavailable: cannot use {shown}: ")
    assert "hunter2" not in line


def test_serve_says_when_its_port_is_taken(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = _serve(["--port", str(port), "--data-dir", str(tmp_path)])
    assert r.exit_code == 6
    assert _one_error_line(r) == f"error: address in use: 127.0.0.1:{port}: Address already in use"


def test_serve_says_when_its_host_is_not_an_address_of_this_machine(tmp_path):
    r = _serve(["--host", "192.0.2.1", "--data-dir", str(tmp_path)])  # TEST-NET-1: never local
    assert r.exit_code == 6
    assert _one_error_line(r) == "error: cannot listen: 192.0.2.1:8000: Cannot assign requested address"
