"""Faults: the server SIGKILLed mid-upload and mid-verification (SQLite and PostgreSQL), the S3
endpoint stopped during push and pull, PostgreSQL restarted under load, the blob store's disk
full, a cached delta corrupted. After each: nothing partial is visible, the index and the store
agree (fsck), retries succeed, GC leaves the store clean.

bench/reliability_faults.py repeats the kills at random moments under concurrent pushes."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from registry.server.blobstores import open_blob_store
from registry.server.db import Database
from registry.server.gc import collect_garbage
from registry.server.models import utcnow
from tests.support.corpus import delta_bytes, sha256, storage_form
from tests.support.harness import (
    RegistryProcess,
    http_push,
    migrate,
    part_targets,
    send_bytes,
    setup_repo,
    wait_until,
)

from .conftest import BACKENDS


def _gc_later(settings, *, expire_uploads: bool = True) -> dict:
    """GC as if the grace period (and, with `expire_uploads`, the upload TTL) had passed."""
    db = Database.from_url(settings.resolved_database_url)
    wait = settings.gc_grace_seconds + 60 + (settings.upload_ttl_seconds if expire_uploads else 0)
    later = utcnow() + dt.timedelta(seconds=wait)
    try:
        return collect_garbage(db=db, store=open_blob_store(settings), settings=settings, now=later).as_dict()
    finally:
        db.dispose()


def _numbers(c: httpx.Client, repo: str = "acme/math") -> list[int]:
    return sorted(
        v["number"] for v in c.get(f"/v1/repos/{repo}/versions", params={"limit": 500}).json()["items"]
    )


def _downloads_verify(c: httpx.Client, repo: str = "acme/math") -> None:
    for v in c.get(f"/v1/repos/{repo}/versions", params={"limit": 500}).json()["items"]:
        r = c.get(f"/v1/repos/{repo}/versions/{v['number']}/download", follow_redirects=True)
        assert r.status_code == 200 and sha256(r.content) == v["digest"], v["number"]


def _send_partial(port: int, upload: dict, data: bytes, fraction: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        f"PUT {upload['upload_url']} HTTP/1.1\r\nHost: "
        "127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data[: int(len(data) * fraction)]
    )
    return sock


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_sigkill_mid_upload_and_mid_verification(registry_process, make_settings):
    settings = make_settings()
    staging = settings.data_dir / "blobs" / "staging"
    big = [
        storage_form(delta_bytes(100 + i, rows=1024, width_bytes=16 << 10)) for i in range(2)
    ]  # 16 MiB each
    server = registry_process()
    with server.client() as c:
        setup_repo(c, "acme/math")
        assert http_push(c, "acme/math", storage_form(delta_bytes(1))).status_code == 201
        cut = c.post("/v1/repos/acme/math/uploads", json=big[0].declaration()).json()
        verifying = c.post("/v1/repos/acme/math/uploads", json=big[1].declaration()).json()
        assert send_bytes(c, verifying, big[1].data) is None

    # 1. SIGKILL while the body of an upload is half received
    sock = _send_partial(server.port, cut, big[0].data, 0.5)
    wait_until(  # the PUT's staged file, written as its bytes are verified
        lambda: any(p.name.startswith(cut["id"]) and p.stat().st_size > 0 for p in staging.iterdir()),
        30,
        "bytes to arrive",
    )
    server.kill()
    sock.close()

    # 2. after a restart: nothing partial is visible and the index agrees with the store
    server = registry_process()
    with server.client() as c:
        assert _numbers(c) == [1]
        assert c.get("/v1/repos/acme/math/versions/latest").json()["number"] == 1
        report = c.get("/v1/admin/fsck").json()
        assert report["ok"] and report["pending_uploads"] == 2, report

        # 3. SIGKILL while `complete` is verifying the second upload's 16 MiB
        done: list = []
        t = threading.Thread(
            target=lambda: done.append(_try(lambda: c.post(verifying["complete_url"], timeout=60)))
        )
        t.start()
        # The bytes were verified as they arrived; `complete` compares, reads the header and moves
        # the staged file to its blob key. On a fast machine it may finish before the poll sees
        # the file go: then the kill lands just after the commit, a case the checks below accept.
        wait_until(
            lambda: not any(staging.glob(f"{verifying['id']}.*")) or done, 60, "the promotion to start"
        )
        time.sleep(0.05)
        server.kill()
        t.join()
    assert (
        not isinstance(done[0], httpx.Response) or done[0].status_code == 201
    )  # the client saw the connection drop

    server = registry_process()
    with server.client() as c:
        numbers = _numbers(c)
        assert numbers in ([1], [1, 2]), numbers  # killed before or just after its commit: never half
        assert c.get("/v1/admin/fsck").json()["ok"]
        # 4. the clients retry: the cut upload sends its bytes again, the other completes again
        assert send_bytes(c, cut, big[0].data) is None
        assert c.post(cut["complete_url"]).status_code == 201
        if numbers == [1]:
            r = c.post(verifying["complete_url"])
            assert r.status_code == 201, r.text
        assert _numbers(c) == [1, 2, 3]
        _downloads_verify(c)
        # 5. GC removes the leftovers: the store is clean and every digest verifies
        _gc_later(settings)
        report = c.get("/v1/admin/fsck").json()
        assert report["clean"] and report["versions"] == 3 and report["bytes_verified"] > 32 << 20, report


def _try(fn):
    try:
        return fn()
    except httpx.HTTPError as exc:
        return exc


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_sigkill_at_random_moments_under_concurrent_pushes(registry_process, make_settings):
    """Four pushers; the server is killed three times at random moments. Every push that got its
    201 is there exactly once, the others are retried to success, and fsck agrees throughout."""
    import random

    settings = make_settings()
    rng = random.Random(7)
    blobs = [storage_form(delta_bytes(200 + i, rows=256, width_bytes=4096)) for i in range(12)]
    server = registry_process()
    with server.client() as c:
        setup_repo(c, "acme/math")
    confirmed: dict[str, int] = {}
    pending = list(blobs)

    def pusher(url, blob):
        with httpx.Client(base_url=url, timeout=30) as pc:
            try:
                r = http_push(pc, "acme/math", blob)
                return (
                    blob.digest,
                    r.status_code,
                    (r.json().get("number") if r.status_code == 201 else None),
                )
            except httpx.HTTPError:
                return blob.digest, None, None

    for round_ in range(4):
        url = server.url  # of this round's process: `server` is replaced after the kill
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(pusher, url, b) for b in pending]
            if round_ < 3:
                time.sleep(rng.uniform(0.05, 0.4))
                server.kill()
            results = [f.result() for f in futures]
        for digest, status, number in results:
            if status == 201:
                confirmed[digest] = number
        server = registry_process()
        with server.client() as c:
            listed = {
                v["digest"]: v["number"]
                for v in c.get("/v1/repos/acme/math/versions", params={"limit": 500}).json()["items"]
            }
            numbers = sorted(listed.values())
            assert numbers == list(range(1, len(numbers) + 1)) or len(set(numbers)) == len(numbers), numbers
            for digest, number in confirmed.items():
                assert listed.get(digest) == number, "a confirmed push was lost or renumbered"
            assert c.get("/v1/admin/fsck").json()["ok"]
        pending = [b for b in blobs if b.digest not in listed]
        if not pending:
            break
    assert not pending, f"{len(pending)} pushes never succeeded"
    with server.client() as c:
        items = c.get("/v1/repos/acme/math/versions", params={"limit": 500}).json()["items"]
        assert (
            len({v["number"] for v in items}) == len(items) == len(blobs)
        )  # no duplicate numbers, none lost
        assert {v["digest"] for v in items} == {b.digest for b in blobs}
        _gc_later(settings)
        report = c.get("/v1/admin/fsck").json()
        assert report["clean"], report


# --- a lost answer to `complete` ------------------------------------------------------------
_COMPLETE = rb"POST /v1/uploads/[0-9a-f]{32}/complete "


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_completing_a_published_upload_again_returns_its_version(registry_process):
    """`complete` succeeds on the server, then the same request is sent again, as a client whose
    answer was lost does: exactly one version, and both answers name it (201, then 200)."""
    server = registry_process()
    with server.client() as c:
        setup_repo(c, "acme/math")
        setup_repo(c, "acme/code")
        blob = storage_form(delta_bytes(1))
        upload = c.post("/v1/repos/acme/math/uploads", json=blob.declaration()).json()
        assert send_bytes(c, upload, blob.data) is None
        first = c.post(upload["complete_url"])
        assert first.status_code == 201, first.text
        again = c.post(upload["complete_url"])
        assert again.status_code == 200, again.text
        assert again.json() == first.json() and first.json()["number"] == 1
        assert _numbers(c) == [1]
        # deduplicated bytes take the other path through `complete`: the same holds
        dedup = c.post("/v1/repos/acme/code/uploads", json=blob.declaration()).json()
        assert dedup["exists"] is True
        answers = [c.post(dedup["complete_url"]) for _ in range(3)]
        assert [r.status_code for r in answers] == [201, 200, 200]
        assert {r.json()["number"] for r in answers} == {1} and _numbers(c, "acme/code") == [1]
        # nothing else moved: one push event each, and the next push gets the next number
        pushes = [
            e["target"]
            for e in c.get("/v1/audit", params={"limit": 100}).json()["items"]
            if e["action"] == "push"
        ]
        assert sorted(pushes) == ["acme/code", "acme/math"]
        assert http_push(c, "acme/math", storage_form(delta_bytes(2))).json()["number"] == 2
        r = c.post(upload["complete_url"])
        assert r.status_code == 200 and r.json()["number"] == 1 and r.json()["tags"] == [], r.text
        assert _numbers(c) == [1, 2]
        assert c.get("/v1/admin/fsck").json()["ok"]


def test_client_push_whose_complete_answer_is_lost_publishes_one_version(live_server, tmp_path):
    """A proxy lets `complete` reach the registry and drops its answer. Lost once: the client sends
    `complete` again and gets the version the first call made. Lost twice: the push fails, and
    running it again returns that same version. Never a second version."""
    from registry.client.api import RegistryApi
    from registry.client.errors import NetworkError
    from tests.support.harness import AnswerLosingProxy

    server = live_server()
    with server.client() as c:
        setup_repo(c, "acme/math")
    first, second = tmp_path / "first.bdelta", tmp_path / "second.bdelta"
    first.write_bytes(delta_bytes(1))
    second.write_bytes(delta_bytes(2))
    home = tmp_path / "home"

    with (
        AnswerLosingProxy(server.port, _COMPLETE, drops=1) as proxy,
        RegistryApi(proxy.url, home=home) as api,
    ):
        pushed = api.push(first, "acme/math")
        assert proxy.dropped == 1  # the registry did answer the first `complete`; the client never saw it
    assert pushed.version.number == 1 and pushed.sent_bytes > 0 and not pushed.already_published
    with server.client() as c:
        assert _numbers(c) == [1]

    with (
        AnswerLosingProxy(server.port, _COMPLETE, drops=2) as proxy,
        RegistryApi(proxy.url, home=home) as api,
    ):
        with pytest.raises(NetworkError):
            api.push(second, "acme/math")
        assert proxy.dropped == 2
        with server.client() as c:
            assert _numbers(c) == [1, 2]  # published, though the client heard nothing
        r = _deltactl(home, proxy.url, "push", second, "acme/math", "--json")
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert again["version"] == 2 and again["already_published"] and again["sent_bytes"] == 0
    with server.client() as c:
        assert _numbers(c) == [1, 2]
        assert c.get("/v1/admin/fsck").json()["ok"]


# --- S3 endpoint down ------------------------------------------------------------------------
class MotoEndpoint:
    """moto's S3 server on a fixed loopback port that can be stopped and started again (its data
    lives in the process, so the buckets survive)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.server = None


@pytest.fixture
def moto_endpoint():
    endpoint = MotoEndpoint()
    endpoint.start()
    yield endpoint
    if endpoint.server is not None:
        endpoint.stop()


def test_s3_endpoint_down_during_push_and_pull(make_client, moto_endpoint):
    import boto3

    boto3.client("s3", endpoint_url=moto_endpoint.url, region_name="us-east-1").create_bucket(Bucket="down")
    client = make_client(
        blob_url="s3://down/reg",
        s3_endpoint_url=moto_endpoint.url,
        s3_max_attempts=2,
        multipart_threshold=64 << 10,
        multipart_part_size=32 << 10,
    )
    setup_repo(client, "acme/math")
    small, big = storage_form(delta_bytes(1)), storage_form(delta_bytes(2, rows=1024, width_bytes=128))
    assert small.size < 64 << 10 < big.size
    assert http_push(client, "acme/math", small).status_code == 201
    upload = client.post("/v1/repos/acme/math/uploads", json=big.declaration()).json()
    assert upload["method"] == "s3-multipart"
    parts = part_targets(client, upload, big.size)
    url, offset, size = parts[0]
    assert httpx.put(url, content=big.data[offset : offset + size]).status_code == 200

    moto_endpoint.stop()
    # push: the client cannot reach the store, and completing says why, registering nothing
    with pytest.raises(httpx.ConnectError):
        httpx.put(parts[1][0], content=b"x", timeout=5)
    r = client.post(upload["complete_url"])
    assert r.status_code == 502 and r.json()["error"]["code"] == "blob_store_error", r.text
    assert "S3" in r.json()["error"]["message"] and "connect" in r.json()["error"]["message"].lower()
    r = client.post(
        "/v1/repos/acme/math/uploads",
        json=storage_form(delta_bytes(3, rows=1024, width_bytes=128)).declaration(),
    )
    assert r.status_code == 502  # a new multipart upload cannot even be created
    assert client.get("/readyz").status_code == 503
    assert [v["number"] for v in client.get("/v1/repos/acme/math/versions").json()["items"]] == [1]
    # pull: the registry still answers (a presigned redirect needs no call to S3); the fetch fails clearly
    r = client.get("/v1/repos/acme/math/versions/1/download", follow_redirects=False)
    assert r.status_code == 307
    with pytest.raises(httpx.ConnectError):
        httpx.get(r.headers["location"], timeout=5)

    moto_endpoint.start()
    # the same upload resumes: the part that arrived is kept, the rest is sent, complete succeeds
    resumed = client.get(f"/v1/uploads/{upload['id']}").json()
    assert [p["number"] for p in resumed["received_parts"]] == [1]
    for url, offset, size in part_targets(client, resumed, big.size)[1:]:
        assert httpx.put(url, content=big.data[offset : offset + size]).status_code == 200
    r = client.post(upload["complete_url"])
    assert r.status_code == 201 and r.json()["number"] == 2, r.text
    for number, blob in ((1, small), (2, big)):
        r = client.get(f"/v1/repos/acme/math/versions/{number}/download", follow_redirects=False)
        assert sha256(httpx.get(r.headers["location"]).content) == blob.digest
    assert client.get("/readyz").status_code == 200
    assert client.get("/v1/admin/fsck").json()["clean"]


# --- PostgreSQL restarted under load ---------------------------------------------------------
def test_postgres_restart_under_load_recovers_without_a_server_restart(tmp_path, pg_cluster):
    env = {"DELTASTORE_DATA_DIR": str(tmp_path / "data"), "DELTASTORE_DATABASE_URL": pg_cluster.url}
    migrate(env)
    with RegistryProcess(env, log_path=tmp_path / "server.log") as server, server.client(timeout=30) as c:
        setup_repo(c, "acme/math")
        assert http_push(c, "acme/math", storage_form(delta_bytes(1))).status_code == 201
        statuses: list[int] = []
        stop = threading.Event()
        pushed: list[int] = []

        def reader():
            with server.client(timeout=30) as rc:
                while not stop.is_set():
                    try:
                        statuses.append(rc.get("/v1/repos/acme/math/versions/latest").status_code)
                    except httpx.HTTPError:
                        statuses.append(-1)

        def writer():
            i = 0
            with server.client(timeout=30) as wc:
                while not stop.is_set():
                    i += 1
                    try:
                        r = http_push(wc, "acme/math", storage_form(delta_bytes(1000 + i)))
                        if r.status_code == 201:
                            pushed.append(r.json()["number"])
                    except httpx.HTTPError:
                        pass

        threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        before = len(statuses)
        pg_cluster.stop("fast")  # terminates every connection the pool holds
        time.sleep(1.5)
        down = statuses[before:]
        pg_cluster.start()
        time.sleep(2.0)
        recovered_from = len(statuses)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
        after = statuses[recovered_from:]
        assert down and set(down) <= {200, 503}, sorted(
            set(down)
        )  # a clean 503 while it is down, never a 500
        assert 503 in down
        assert after and set(after) == {200}, sorted(set(after))  # the same server process serves again
        assert server.proc.poll() is None
        # every push the clients saw succeed is there once, numbered without a gap or duplicate
        numbers = _numbers(c)
        assert numbers == list(range(1, len(numbers) + 1)) and set(pushed) <= set(numbers)
        assert c.get("/v1/admin/fsck").json()["ok"]
        r = c.get("/v1/repos", headers={})
        assert r.status_code == 200
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def _deltactl(home: Path, registry: str, *args):
    """`deltactl ARGS` in-process against `registry`, with its own DELTACTL_HOME and no token."""
    from typer.testing import CliRunner

    from cli.main import app

    env = {"DELTACTL_HOME": str(home), "DELTACTL_REGISTRY": registry, "DELTACTL_TOKEN": None}
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def _push_lands(home: Path, server, path: Path, version: int) -> None:
    """`deltactl push PATH acme/math` succeeds as `version`, versions 1..version all exist and
    fsck finds the registry consistent (what every recovery below must end with)."""
    again = _deltactl(home, server.url, "push", path, "acme/math")
    assert again.exit_code == 0, again.output
    assert f"pushed acme/math@{version}" in again.stdout
    with server.client() as c:
        assert _numbers(c) == list(range(1, version + 1))
        assert c.get("/v1/admin/fsck").json()["ok"]


def test_client_and_cli_name_an_unavailable_database_and_lose_nothing(tmp_path, pg_cluster, monkeypatch):
    """PostgreSQL stopped under a running registry: the client raises DatabaseUnavailableError and
    deltactl exits with the network code, both saying what is wrong, that nothing is lost and when
    to retry; once the database is back the same command succeeds and the earlier version is intact."""
    from cli import errors as exit_codes
    from registry.client.api import RegistryApi
    from registry.common.errors import DatabaseUnavailableError

    # Reads would wait out the 503s' Retry-After first (test_unavailable.py tests that); not here.
    monkeypatch.setenv("DELTACTL_UNAVAILABLE_MAX_WAIT", "0")

    env = {"DELTASTORE_DATA_DIR": str(tmp_path / "data"), "DELTASTORE_DATABASE_URL": pg_cluster.url}
    migrate(env)
    first, second = tmp_path / "first.bdelta", tmp_path / "second.bdelta"
    first.write_bytes(delta_bytes(1))
    second.write_bytes(delta_bytes(2))
    home = tmp_path / "home"
    with RegistryProcess(env, log_path=tmp_path / "server.log") as server:
        with server.client() as c:
            setup_repo(c, "acme/math")
        pushed = _deltactl(home, server.url, "push", first, "acme/math")
        assert pushed.exit_code == 0, pushed.output

        pg_cluster.stop("fast")
        expected = (
            f"the registry at {server.url} cannot use its database right now: the registry database is "
            "unavailable; retry shortly. Nothing was changed and nothing already stored is lost; retry in 2 s"
        )
        with RegistryApi(server.url, home=home) as api:
            for call in (lambda: api.push(second, "acme/math"), lambda: api.pull("acme/math"), api.repos):
                with pytest.raises(DatabaseUnavailableError) as info:
                    call()
                assert str(info.value) == expected
        for args in (["push", second, "acme/math"], ["pull", "acme/math"]):
            r = _deltactl(home, server.url, *args)
            assert r.exit_code == exit_codes.EXIT_NETWORK, r.output
            assert r.stderr == f"error: registry unavailable: {expected}\n", r.stderr

        pg_cluster.start()
        _push_lands(home, server, second, 2)
        with RegistryApi(server.url, home=home) as api:
            pulled = api.pull("acme/math@1")
            assert sha256(Path(pulled.blob).read_bytes()) == sha256(delta_bytes(1))
    assert "Traceback" not in (tmp_path / "server.log").read_text()


# --- disk full -------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_is_a_clear_error_and_leaves_no_corrupt_blob(make_client, small_tmpfs):
    client = make_client(blob_url=small_tmpfs.as_uri())
    setup_repo(client, "acme/math")
    fits = storage_form(delta_bytes(1, rows=512, width_bytes=8 << 10))  # 4 MiB
    assert http_push(client, "acme/math", fits).status_code == 201
    too_big = storage_form(delta_bytes(2, rows=1024, width_bytes=10 << 10))  # 10 MiB: more than is left
    upload = client.post("/v1/repos/acme/math/uploads", json=too_big.declaration()).json()
    r = client.put(upload["upload_url"], content=too_big.data)
    assert r.status_code == 507, r.text
    body = r.json()["error"]
    assert (
        body["code"] == "insufficient_storage"
        and "full" in body["message"]
        and str(small_tmpfs) not in body["message"]
    )
    staging = small_tmpfs / "staging"
    assert list(staging.iterdir()) == []  # the partial bytes were removed, and their space freed
    assert client.post(upload["complete_url"]).status_code == 409  # nothing to complete
    assert [v["number"] for v in client.get("/v1/repos/acme/math/versions").json()["items"]] == [1]
    report = client.get("/v1/admin/fsck").json()
    assert report["ok"] and report["digest_mismatches"] == 0, report
    # with room again (the first version deleted and collected), the same upload goes through
    assert client.delete("/v1/repos/acme/math/versions/1").status_code == 200
    _gc_later(client.app.state.registry.settings, expire_uploads=False)
    r = client.put(upload["upload_url"], content=too_big.data)
    assert r.status_code == 200, r.text
    assert client.post(upload["complete_url"]).status_code == 201
    assert client.get("/v1/admin/fsck").json()["clean"]


def test_client_and_cli_name_a_full_blob_store_and_lose_nothing(live_server, small_tmpfs, tmp_path):
    """The local blob store's disk fills up: pushing raises StorageFullError and deltactl exits with
    its own code, saying what is wrong and that nothing is lost; nothing partial is left, the
    earlier version still pulls intact, and once space is freed the same command succeeds."""
    from cli import errors as exit_codes
    from registry.client.api import RegistryApi
    from registry.common.errors import StorageFullError

    server = live_server(blob_url=(small_tmpfs / "blobs").as_uri())
    with server.client() as c:
        setup_repo(c, "acme/math")
    home = tmp_path / "home"
    first, big = tmp_path / "first.bdelta", tmp_path / "big.bdelta"
    first.write_bytes(delta_bytes(1))
    big.write_bytes(
        delta_bytes(2, rows=512, width_bytes=4 << 10)
    )  # 2 MiB of random signs: zstd cannot shrink it
    assert _deltactl(home, server.url, "push", first, "acme/math").exit_code == 0
    disk = os.statvfs(small_tmpfs)
    filler = small_tmpfs / "filler"  # beside the blob store: leaves it 1 MiB
    filler.write_bytes(bytes(disk.f_bavail * disk.f_frsize - (1 << 20)))

    expected = (
        f"the registry at {server.url} is out of storage: the blob store is full; nothing was stored (free "
        "space, then push again). Nothing already stored is lost; retry once space has been freed there "
        "(re-running a push resumes it)"
    )
    with RegistryApi(server.url, home=home) as api:
        with pytest.raises(StorageFullError) as info:
            api.push(big, "acme/math")
    assert str(info.value) == expected
    r = _deltactl(home, server.url, "push", big, "acme/math")
    assert r.exit_code == exit_codes.EXIT_STORAGE_FULL == 9, r.output
    assert r.stderr == f"error: registry storage full: {expected}\n", r.stderr
    with server.client() as c:
        assert _numbers(c) == [1]
        assert list((small_tmpfs / "blobs" / "staging").iterdir()) == []  # no partial bytes kept
    with RegistryApi(server.url, home=home) as api:
        assert sha256(Path(api.pull("acme/math@1").blob).read_bytes()) == sha256(delta_bytes(1))

    filler.unlink()
    _push_lands(home, server, big, 2)


# --- a corrupted cached delta ----------------------------------------------------------------
def test_a_corrupted_cached_delta_is_caught_before_use(live_server, tmp_path):
    from registry.client.api import RegistryApi

    server = live_server()
    with server.client() as c:
        setup_repo(c, "acme/math")
        blob = storage_form(delta_bytes(1))
        assert http_push(c, "acme/math", blob).status_code == 201
    with RegistryApi(server.url, home=tmp_path / "home") as api:
        first = api.pull("acme/math")
        data = bytearray(Path(first.blob).read_bytes())
        data[-5] ^= 0x01  # a sign bit flipped on disk: same size, still a structurally valid file
        Path(first.blob).write_bytes(bytes(data))
        second = api.pull("acme/math")
        # The digest check caught it: not served from the cache, downloaded again, intact.
        assert second.repaired and not second.cache_hit and second.downloaded_bytes > 0
        assert Path(second.blob).read_bytes() != bytes(data)
        from codec.files import sha256_file

        assert sha256_file(second.blob) == second.version.blob.raw_digest


def _pull_with_store_down(live_server, moto_endpoint, tmp_path):
    import boto3

    from registry.client.api import RegistryApi
    from registry.client.errors import NetworkError

    boto3.client("s3", endpoint_url=moto_endpoint.url, region_name="us-east-1").create_bucket(Bucket="pulls")
    server = live_server(blob_url="s3://pulls/reg", s3_endpoint_url=moto_endpoint.url, s3_max_attempts=2)
    blob = storage_form(delta_bytes(1))
    with server.client() as c:
        setup_repo(c, "acme/math")
        assert http_push(c, "acme/math", blob).status_code == 201
    api = RegistryApi(server.url, home=tmp_path / "home")
    moto_endpoint.stop()
    with pytest.raises(NetworkError) as info:
        api.pull("acme/math")
    return api, blob, info.value


def test_client_pull_with_the_blob_store_down_fails_and_resumes(live_server, moto_endpoint, tmp_path):
    """Through the project's client (registry/client.py): a pull while S3 is down raises a
    NetworkError and leaves nothing in the cache; the same pull works once S3 is back."""
    api, blob, _ = _pull_with_store_down(live_server, moto_endpoint, tmp_path)
    with api:
        assert not list((tmp_path / "home").rglob("*.bdelta"))
        moto_endpoint.start()
        pulled = api.pull("acme/math")
        assert sha256(Path(pulled.blob).read_bytes()) == blob.raw_digest


def test_client_pull_with_the_blob_store_down_names_the_blob_store(live_server, moto_endpoint, tmp_path):
    api, _, error = _pull_with_store_down(live_server, moto_endpoint, tmp_path)
    api.close()
    from registry.client.errors import BlobStoreUnreachableError

    message = str(error)  # the registry is up: the error must name what is down
    assert "blob store" in message.lower() and f"127.0.0.1:{moto_endpoint.port}" in message, message
    assert isinstance(error, BlobStoreUnreachableError) and "is it running" not in message, message


class _StopStoreWhenUploading:
    """A push's progress watcher that stops the S3 endpoint the moment the bytes start to move:
    the registry has answered (and begun the multipart upload), the store is then gone."""

    def __init__(self, endpoint: MotoEndpoint):
        self.endpoint = endpoint

    def start(self, phase: str, total, completed: int = 0) -> None:
        if phase == "uploading" and self.endpoint.server is not None:
            self.endpoint.stop()

    def advance(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass


def test_client_push_with_the_blob_store_down_names_the_blob_store(live_server, moto_endpoint, tmp_path):
    """Pushing while S3 is down: the registry answers with presigned URLs, the PUTs to the store
    fail. The error says it is the blob store at its host:port that cannot be reached (as for a
    pull), for a single PUT and for parts; deltactl exits 6; once the store is back the same push
    completes, resuming the same upload."""
    import boto3

    from cli import errors as exit_codes
    from registry.client.api import RegistryApi
    from registry.client.errors import BlobStoreUnreachableError, TransferInterruptedError

    boto3.client("s3", endpoint_url=moto_endpoint.url, region_name="us-east-1").create_bucket(Bucket="pushes")
    server = live_server(
        blob_url="s3://pushes/reg",
        s3_endpoint_url=moto_endpoint.url,
        s3_max_attempts=2,
        multipart_threshold=64 << 10,
        multipart_part_size=32 << 10,
    )
    with server.client() as c:
        setup_repo(c, "acme/math")
    small, big = tmp_path / "small.bdelta", tmp_path / "big.bdelta"
    small.write_bytes(delta_bytes(1))
    big.write_bytes(delta_bytes(2, rows=1024, width_bytes=128))
    store = f"127.0.0.1:{moto_endpoint.port}"
    home = tmp_path / "home"

    # a single presigned PUT (no S3 call is needed to hand it out): the store is down from the start
    moto_endpoint.stop()
    with RegistryApi(server.url, home=home) as api, pytest.raises(BlobStoreUnreachableError) as info:
        api.push(small, "acme/math")
    message = str(info.value)
    assert message.startswith(f"cannot reach the blob store at {store} (") and message.endswith(
        f") for the upload; the registry at {server.url} answered, "
        "but the store it points to did not: retry when "
        "the store is reachable again (running the same push again resumes it)"
    ), message
    r = _deltactl(home, server.url, "push", small, "acme/math")
    assert r.exit_code == exit_codes.EXIT_NETWORK == 6, r.output
    assert r.stderr.startswith(f"error: network: cannot reach the blob store at {store} ("), r.stderr
    with server.client() as c:
        assert _numbers(c) == []
    moto_endpoint.start()
    again = _deltactl(home, server.url, "push", small, "acme/math")
    assert again.exit_code == 0 and "pushed acme/math@1" in again.stdout, again.output

    # parts: the store goes away once the registry has begun the multipart upload
    with RegistryApi(server.url, home=home) as api, pytest.raises(TransferInterruptedError) as info:
        api.push(big, "acme/math", progress=_StopStoreWhenUploading(moto_endpoint))
    message = str(info.value)
    assert message.startswith(
        f"push interrupted with 0 parts stored (cannot reach the blob store at {store} ("
    ), message
    assert message.endswith(") for the upload); run the same command again to send only the missing parts"), (
        message
    )
    moto_endpoint.start()
    _push_lands(home, server, big, 2)
