"""Schemathesis against the registry's own OpenAPI document, every operation, with auth off, with
an admin token and with no or a bogus token: no server error, and every response (status code,
content type, headers, body) is one the document describes.

The short seeded runs here are the CI portion; bench/reliability_openapi.py runs the same with
many more examples per operation.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.harness import RegistryProcess, migrate

CONFIG = Path(__file__).with_name("schemathesis.toml")
ADMIN = "openapi-admin-secret"
#: Every check, "schema-valid request accepted" included: any cursor the document allows is a
#: position the server answers (see schemathesis.toml for the one operation it cannot describe).
CHECKS = "all"


def schemathesis_run(
    url: str, *, max_examples: int, seed: int, headers: dict[str, str], report_dir: Path, timeout: float = 600
) -> tuple[int, str, int]:
    """Run `schemathesis run` on the server's /openapi.json; returns (exit code, output, cases generated)."""
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if exe is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    args = [
        exe,
        "--config-file",
        str(CONFIG),
        "run",
        f"{url}/openapi.json",
        "--checks",
        CHECKS,
        "--max-examples",
        str(max_examples),
        "--seed",
        str(seed),
        "--workers",
        "1",
        "--report",
        "junit",
        "--report-dir",
        str(report_dir),
        "--request-timeout",
        "60",
    ]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=report_dir)
    output = proc.stdout + proc.stderr
    generated = re.search(r"(\d+) generated", output)
    return proc.returncode, output, int(generated.group(1)) if generated else 0


RUNS = {
    "auth-off": ({}, {}),
    "auth-on-admin-token": (
        {"auth_enabled": "true", "admin_token": ADMIN},
        {"Authorization": f"Bearer {ADMIN}"},
    ),
    "auth-on-no-token": ({"auth_enabled": "true", "admin_token": ADMIN}, {}),
    "auth-on-bogus-token": (
        {"auth_enabled": "true", "admin_token": ADMIN},
        {"Authorization": "Bearer dst_not-a-token"},
    ),
}


#: Examples per operation and phase in CI (token-less runs mostly meet 401s, so fewer).
CI_EXAMPLES = {"auth-off": 12, "auth-on-admin-token": 12, "auth-on-no-token": 5, "auth-on-bogus-token": 5}


@pytest.mark.parametrize("run", list(RUNS))
def test_every_operation_conforms_and_never_fails(tmp_path, run):
    env_settings, headers = RUNS[run]
    env = {
        "DELTASTORE_DATA_DIR": str(tmp_path / "data"),
        **{f"DELTASTORE_{k.upper()}": v for k, v in env_settings.items()},
    }
    migrate(env)
    with RegistryProcess(env, log_path=tmp_path / "registry.log") as server:
        code, output, generated = schemathesis_run(
            server.url, max_examples=CI_EXAMPLES[run], seed=20261125, headers=headers, report_dir=tmp_path
        )
    assert code == 0, output[-6000:]
    assert generated > 300, output[-2000:]
    assert "Traceback" not in (tmp_path / "registry.log").read_text(), "the server logged an unhandled error"


def test_method_not_allowed_names_every_method_of_the_path(client):
    """Starlette's 405 named only the first matching route's methods (GET for /v1/repos, hiding POST)."""
    for path, allowed in {
        "/v1/repos": "GET, POST",
        "/v1/repos/acme/math": "DELETE, GET",
        "/v1/tokens": "GET, POST",
        "/v1/repos/acme/math/versions/1": "DELETE, GET",
        "/v1/repos/acme/math/tags/prod": "DELETE, PUT",
    }.items():
        r = client.request("PATCH", path)
        assert (r.status_code, r.headers["allow"]) == (405, allowed), path
        assert r.json()["error"]["code"] == "method_not_allowed"


def test_the_document_states_this_servers_limits(make_client):
    client = make_client(max_upload_bytes=1000, max_raw_bytes=5000)
    props = client.get("/openapi.json").json()["components"]["schemas"]["UploadCreate"]["properties"]
    assert (props["size"]["maximum"], props["raw_size"]["maximum"]) == (1000, 5000)
