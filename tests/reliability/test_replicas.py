"""Several `deltactl serve` processes on one PostgreSQL and one S3 behave as one registry: they
migrate once when started together, number versions uniquely and consecutively with pushers spread
over them, lose nothing when one is killed mid-push, and GC on one never takes the bytes a push on
another is completing (docs/registry.md, "Running several replicas")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from registry.client.api import RegistryApi
from registry.client.errors import NetworkError
from tests.support.corpus import BASE_NAME, FINGERPRINT, delta_bytes, storage_form
from tests.support.harness import ROOT, free_port, send_bytes, wait_until

pytestmark = [pytest.mark.parametrize("database_url", ["postgres"], indirect=True), pytest.mark.postgres]
PUSHERS, PER_PUSHER = 8, 10


class Replica:
    """One registry replica as an operator starts it: `deltactl db upgrade && deltactl serve`,
    with a data directory of its own (it must hold nothing there that the others need)."""

    def __init__(self, env: dict[str, str], data_dir: Path, log_path: Path):
        self.port = free_port()
        self.env = {**os.environ, **env, "DELTASTORE_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT)}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Replica:
        deltactl = f"{sys.executable} -m cli.main"
        script = f"{deltactl} db upgrade && exec {deltactl} serve --port {self.port}"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["sh", "-c", script],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 120) -> Replica:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"replica exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, f"the replica on port {self.port} to be ready")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)


@pytest.fixture
def replicas(tmp_path, database_url, s3_endpoint, s3_bucket):
    """Start replicas on one fresh (un-migrated) PostgreSQL database and one S3 bucket; every one
    started is killed at the end. `start(n, **settings)` starts n at once and waits for them."""
    env = {
        "DELTASTORE_DATABASE_URL": database_url,
        "DELTASTORE_BLOB_URL": f"s3://{s3_bucket}/registry",
        "DELTASTORE_S3_ENDPOINT_URL": s3_endpoint,
    }
    started: list[Replica] = []

    def start(n: int, **settings) -> list[Replica]:
        extra = {f"DELTASTORE_{k.upper()}": str(v) for k, v in settings.items()}
        batch = [
            Replica(
                {**env, **extra},
                tmp_path / f"replica-{len(started) + i}",
                tmp_path / f"replica-{len(started) + i}.log",
            )
            for i in range(n)
        ]
        started.extend(batch)
        for replica in batch:
            replica.start()
        return [replica.wait_ready() for replica in batch]

    start.env = env
    yield start
    for replica in started:
        replica.kill()


def _register(replica: Replica, *repos: str) -> None:
    with replica.client() as c:
        assert c.post("/v1/bases", json={"name": BASE_NAME, "fingerprint": FINGERPRINT}).status_code in (
            200,
            201,
        )
        for repo in repos:
            ns, name = repo.split("/")
            assert (
                c.post("/v1/repos", json={"namespace": ns, "name": name, "base": BASE_NAME}).status_code
                == 201
            )


def _numbers(replica: Replica, repo: str) -> list[int]:
    with replica.client() as c:
        return sorted(
            v["number"] for v in c.get(f"/v1/repos/{repo}/versions", params={"limit": 500}).json()["items"]
        )


def _fsck(env: dict[str, str], tmp_path: Path) -> tuple[int, str]:
    """`deltactl fsck --json` run like an operator would, on the replicas' database and bucket."""
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "fsck", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env, "DELTASTORE_DATA_DIR": str(tmp_path / "fsck"), "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_pushers_spread_over_two_replicas_get_versions_1_to_80(replicas, tmp_path):
    """Two replicas started together (each migrating first) on one fresh database; 8 pushers with
    the real client, each alternating between the replicas, 10 versions each into one repository:
    the versions are exactly 1..80, each pulls (through either replica) byte-identical to what
    was pushed, and `deltactl fsck` finds the registry clean."""
    a, b = replicas(2)
    _register(a, "acme/shared")
    files = []
    for i in range(PUSHERS * PER_PUSHER):
        path = tmp_path / "deltas" / f"d{i}.bdelta"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(delta_bytes(1000 + i, rows=64, width_bytes=512))
        files.append(path)

    def pusher(p: int) -> list[tuple[int, Path]]:
        apis = [RegistryApi(r.url, home=tmp_path / f"home-{p}") for r in (a, b)]
        try:
            return [
                (apis[k % 2].push(path, "acme/shared").version.number, path)
                for k, path in enumerate(files[p * PER_PUSHER : (p + 1) * PER_PUSHER])
            ]
        finally:
            for api in apis:
                api.close()

    with ThreadPoolExecutor(PUSHERS) as pool:
        pushed = [item for items in pool.map(pusher, range(PUSHERS)) for item in items]
    numbers = sorted(n for n, _ in pushed)
    assert numbers == list(range(1, PUSHERS * PER_PUSHER + 1))
    assert _numbers(a, "acme/shared") == _numbers(b, "acme/shared") == numbers

    pulls = [RegistryApi(r.url, home=tmp_path / f"pull-{r.port}") for r in (a, b)]
    try:
        for number, path in pushed:
            pulled = pulls[number % 2].pull(f"acme/shared@{number}")
            assert pulled.blob.read_bytes() == path.read_bytes(), number
    finally:
        for api in pulls:
            api.close()
    code, output = _fsck(replicas.env, tmp_path)
    assert code == 0, output
    report = json.loads(output)
    assert report["clean"] and report["versions"] == report["blobs"] == 80, report


class _KillWhenUploading:
    """A push's progress watcher that SIGKILLs a replica as the bytes start to move to the store:
    that replica declared the upload and is gone before it can complete it."""

    def __init__(self, replica: Replica):
        self.replica = replica

    def start(self, phase: str, total, completed: int = 0) -> None:
        if phase == "uploading":
            self.replica.kill()

    def advance(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass


def test_a_replica_killed_mid_push_leaves_nothing_visible_and_the_push_succeeds_through_another(
    replicas, tmp_path
):
    a, b = replicas(2)
    _register(a, "acme/math")
    first = tmp_path / "first.bdelta"
    first.write_bytes(delta_bytes(1))
    assert RegistryApi(b.url, home=tmp_path / "home").push(first, "acme/math").version.number == 1

    # 1. the client's push: the replica that declared the upload dies as the bytes go to S3
    cut = tmp_path / "cut.bdelta"
    cut.write_bytes(delta_bytes(2, rows=256, width_bytes=2048))
    with pytest.raises(NetworkError, match=f"127.0.0.1:{a.port}"):
        RegistryApi(a.url, home=tmp_path / "home").push(cut, "acme/math", progress=_KillWhenUploading(a))
    assert a.proc.poll() is not None
    assert _numbers(b, "acme/math") == [1]  # nothing partial is visible through the other replica
    pushed = RegistryApi(b.url, home=tmp_path / "home").push(cut, "acme/math")
    assert pushed.version.number == 2

    # 2. a replica killed while `complete` verifies 16 MiB: the upload completes through another
    (c_replica,) = replicas(1)
    big = storage_form(delta_bytes(3, rows=1024, width_bytes=16 << 10))
    with c_replica.client() as c:
        upload = c.post("/v1/repos/acme/math/uploads", json=big.declaration()).json()
        assert send_bytes(c, upload, big.data) is None
    answer: list = []

    def complete() -> None:
        try:
            with c_replica.client() as c:
                answer.append(c.post(upload["complete_url"]).status_code)
        except httpx.HTTPError as exc:
            answer.append(type(exc).__name__)

    thread = threading.Thread(target=complete)
    thread.start()
    time.sleep(0.3)
    c_replica.kill()
    thread.join()
    before = _numbers(b, "acme/math")
    assert before in ([1, 2], [1, 2, 3]), before  # before or after its commit: never a half version
    with b.client() as c:
        r = c.post(upload["complete_url"])
        assert (r.status_code, r.json()["number"]) == (201 if before == [1, 2] else 200, 3), (answer, r.text)
        r = c.get("/v1/repos/acme/math/versions/3/download", follow_redirects=True)
        assert r.status_code == 200 and r.content == big.data
    assert _numbers(b, "acme/math") == [1, 2, 3]
    code, output = _fsck(replicas.env, tmp_path)
    assert code == 0, output  # consistent; the killed push's upload is left for GC once it expires


def test_gc_on_one_replica_spares_the_uploads_another_is_completing(replicas, tmp_path):
    """GC with no grace period on replica B while replica A holds two pushes between their
    bytes and `complete`: one of new bytes (staged in S3), one deduplicated against a blob whose
    only version was deleted (unreferenced but for the upload). Both complete afterwards."""
    (a,) = replicas(1)
    (b,) = replicas(1, gc_grace_seconds=0)
    _register(a, "acme/math")
    old, new = storage_form(delta_bytes(10)), storage_form(delta_bytes(11))
    with a.client() as c:
        r = c.post("/v1/repos/acme/math/uploads", json=old.declaration())
        assert send_bytes(c, r.json(), old.data) is None
        assert c.post(r.json()["complete_url"]).status_code == 201
        assert c.delete("/v1/repos/acme/math/versions/1").status_code == 200  # its blob is unreferenced now
        staged = c.post("/v1/repos/acme/math/uploads", json=new.declaration()).json()
        assert send_bytes(c, staged, new.data) is None
        dedup = c.post("/v1/repos/acme/math/uploads", json=old.declaration()).json()
        assert dedup["method"] == "exists"
    with b.client() as c:
        report = c.post("/v1/admin/gc").json()
    assert (report["blobs"], report["staged_objects"], report["stale_uploads"]) == (0, 0, 0), report
    with a.client() as c:
        assert c.post(staged["complete_url"]).json()["number"] == 2
        assert c.post(dedup["complete_url"]).json()["number"] == 3
        for number, blob in ((2, new), (3, old)):
            r = c.get(f"/v1/repos/acme/math/versions/{number}/download", follow_redirects=True)
            assert r.status_code == 200 and r.content == blob.data
    code, output = _fsck(replicas.env, tmp_path)
    assert code == 0, output
