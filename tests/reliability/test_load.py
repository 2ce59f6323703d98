"""Concurrent pushers into one repository and into one each, on SQLite (WAL) and PostgreSQL: no
lost or duplicate version numbers, every blob's digest verified afterwards; then a read load from a
second process. The CI portion is short; bench/reliability_load.py holds 8 x 50 and 10,000 deltas."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import BACKENDS
from .harness import ROOT
from .load import check_pushes, push_load

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)


@pytest.mark.parametrize("same_repo", [True, False], ids=["same-repository", "one-repository-each"])
def test_concurrent_pushers_lose_nothing(registry_process, same_repo):
    server = registry_process()
    load = push_load(server.url, pushers=8, per_pusher=4, same_repo=same_repo)
    assert load.errors == [] and load.pushes == 32
    checked = check_pushes(server.url, load)
    assert checked["lost"] == checked["duplicates"] == checked["download_mismatches"] == 0, checked
    assert checked["downloads_verified"] == 32 and checked["fsck_ok"] and checked["fsck_blobs"] == 32, checked


def test_read_load_from_a_second_process(registry_process):
    server = registry_process()
    load = push_load(server.url, pushers=4, per_pusher=5, same_repo=False, namespace="reads")
    assert load.pushes == 20
    code = (
        "import json, sys; from tests.reliability.load import read_load; "
        f"r = read_load({server.url!r}, [('reads/r%d' % i, 5) for i in range(4)], requests=400, concurrency=4, time_limit=60); "
        "print(json.dumps(r.summary()))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["errors"] == 0 and summary["requests"] == 400, summary
    assert summary["statuses"] == {"200": 400}
