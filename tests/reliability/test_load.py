"""Concurrent pushers into one repository and into one each, on SQLite (WAL) and PostgreSQL: no
lost or duplicate version numbers, every blob's digest verified afterwards; then a read load from a
second process. The CI portion is short; bench/reliability_load.py holds 8 x 50 and 10,000 deltas."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.harness import ROOT
from tests.support.load import check_pushes, push_load

from .conftest import BACKENDS

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
        "import json, sys; from tests.support.load import read_load; "
        f"r = read_load({server.url!r}, [('reads/r%d' % i, 5) for i "
        "in range(4)], requests=400, concurrency=4, time_limit=60); "
        "print(json.dumps(r.summary()))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["errors"] == 0 and summary["requests"] == 400, summary
    assert summary["statuses"] == {"200": 400}


def test_racing_completes_of_one_upload_publish_it_once(registry_process):
    """Clients that retry `complete` while the first call is still verifying: one version; the
    other calls get that same version (200) or a 4xx, never a 500 from the staged file moving
    underneath them, never a second version."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from tests.support.corpus import delta_bytes, storage_form
    from tests.support.harness import send_bytes, setup_repo

    server = registry_process()

    def complete(upload):
        with httpx.Client(base_url=server.url, timeout=60) as rc:
            r = rc.post(upload["complete_url"])
            return r.status_code, r.json().get("number")

    with server.client() as c:
        setup_repo(c, "race/one")
        for i in range(6):
            blob = storage_form(delta_bytes(500 + i, rows=512, width_bytes=2048))
            upload = c.post("/v1/repos/race/one/uploads", json=blob.declaration()).json()
            assert send_bytes(c, upload, blob.data) is None
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(complete, [upload] * 4))
            statuses = sorted(status for status, _ in answers)
            assert statuses.count(201) == 1 and all(s in (200, 201, 404, 409) for s in statuses), statuses
            assert {number for status, number in answers if status in (200, 201)} == {i + 1}, answers
        numbers = [v["number"] for v in c.get("/v1/repos/race/one/versions").json()["items"]]
        assert sorted(numbers) == list(range(1, 7))
        assert c.get("/v1/admin/fsck").json()["ok"]
