"""Fault-injection campaigns (not a test; prints a table and writes JSON).

1. kill:   8 pushers while the registry is SIGKILLed at random moments and restarted, on SQLite and
           PostgreSQL. Pushers retry like an idempotent client (a push whose answer was lost is
           looked up by digest before it is sent again). After every restart fsck must report no
           problem; at the end every delta is there exactly once, numbered 1..N, its download
           verifies, and after GC the store is clean.
2. s3:     the S3 endpoint (moto) stopped and started under 4 pushers and a puller; the registry
           answers 502 blob_store_error, never registers half a push, and works when S3 is back.
3. pg:     PostgreSQL restarted (fast and immediate shutdowns) under a read and push load; the
           same server process recovers: no 500, the outage window and recovery time measured.
4. disk:   a 16 MiB tmpfs blob store filled again and again: 507 insufficient_storage, no partial
           blob, and pushes succeed again once GC has made room (needs root for the mount).

    nice -n 10 python bench/reliability_faults.py --kills 30
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault(
    "S3_UPLOAD_PART_MIN_SIZE", "1024"
)  # moto: small parts, so blobs of a few MiB have several

from tests.support.corpus import delta_bytes, sha256, storage_form  # noqa: E402
from tests.support.harness import (  # noqa: E402
    PostgresCluster,
    RegistryProcess,
    http_push,
    migrate,
    postgres_available,
    settings_from_env,
    setup_repo,
)


def gc_later(env: dict) -> dict:
    from registry.server.blobstores import open_blob_store
    from registry.server.db import Database
    from registry.server.gc import collect_garbage
    from registry.server.models import utcnow

    settings = settings_from_env(env)
    db = Database.from_url(settings.resolved_database_url)
    later = utcnow() + dt.timedelta(seconds=settings.upload_ttl_seconds + settings.gc_grace_seconds + 60)
    try:
        return collect_garbage(db=db, store=open_blob_store(settings), settings=settings, now=later).as_dict()
    finally:
        db.dispose()


def listed(c: httpx.Client, repo: str) -> list[dict]:
    items, cursor = [], None
    while True:
        r = c.get(
            f"/v1/repos/{repo}/versions", params={"limit": 500, **({"cursor": cursor} if cursor else {})}
        )
        r.raise_for_status()
        page = r.json()
        items += page["items"]
        if not (cursor := page["next_cursor"]):
            return items


# --- 1. SIGKILL at random moments ------------------------------------------------------------
def campaign_kill(
    database_url: str, label: str, kills: int, pushers: int, per_pusher: int, seed: int
) -> dict:
    rng = random.Random(seed)
    data = tempfile.mkdtemp(prefix="ds-kill-")
    env = {"DELTASTORE_DATA_DIR": data, "DELTASTORE_DATABASE_URL": database_url}
    migrate(env)
    server = RegistryProcess(env, log_path=Path(data) / "server.log").start()
    url = server.url
    repo = "kill/shared"
    with httpx.Client(base_url=url, timeout=30) as c:
        setup_repo(c, repo)
    blobs = [
        storage_form(delta_bytes(50_000 + i, rows=128, width_bytes=1024)) for i in range(pushers * per_pusher)
    ]
    confirmed: dict[str, int] = {}
    stats = {"attempts": 0, "failed_attempts": 0, "found_after_lost_answer": 0}
    lock = threading.Lock()
    up = threading.Event()
    up.set()
    stop = threading.Event()

    def exists(c: httpx.Client, digest: str) -> int | None:
        for v in listed(c, repo):
            if v["digest"] == digest:
                return v["number"]
        return None

    def pusher(i: int) -> None:
        for blob in blobs[i * per_pusher : (i + 1) * per_pusher]:
            uncertain = False
            while not stop.is_set():
                up.wait(60)
                try:
                    with httpx.Client(base_url=url, timeout=30) as c:
                        if uncertain and (number := exists(c, blob.digest)) is not None:
                            with lock:
                                confirmed[blob.digest] = number
                                stats["found_after_lost_answer"] += 1
                            break
                        with lock:
                            stats["attempts"] += 1
                        r = http_push(c, repo, blob)
                    if r.status_code == 201:
                        with lock:
                            confirmed[blob.digest] = r.json()["number"]
                        break
                    uncertain = True
                except httpx.HTTPError:
                    uncertain = True
                with lock:
                    stats["failed_attempts"] += 1
                time.sleep(0.05)

    threads = [threading.Thread(target=pusher, args=(i,)) for i in range(pushers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    fsck_problems = restarts = 0
    for _ in range(kills):
        time.sleep(rng.uniform(0.2, 1.5))
        if not any(t.is_alive() for t in threads):
            break
        up.clear()
        server.kill()
        server = RegistryProcess(env, log_path=Path(data) / "server.log", port=server.port).start()
        restarts += 1
        with httpx.Client(base_url=url, timeout=120) as c:
            if not c.get("/v1/admin/fsck", params={"digests": "false"}).json()["ok"]:
                fsck_problems += 1
        up.set()
    for t in threads:
        t.join(600)
    stop.set()
    seconds = time.perf_counter() - t0
    with httpx.Client(base_url=url, timeout=600) as c:
        items = listed(c, repo)
        numbers = [v["number"] for v in items]
        by_digest: dict[str, list[int]] = {}
        for v in items:
            by_digest.setdefault(v["digest"], []).append(v["number"])
        lost = sum(1 for b in blobs if b.digest not in by_digest)
        twice = sum(1 for n in by_digest.values() if len(n) > 1)
        renumbered = sum(1 for d, n in confirmed.items() if by_digest.get(d) != [n])
        bad_downloads = sum(
            1
            for v in items
            if sha256(c.get(f"/v1/repos/{repo}/versions/{v['number']}/download").content) != v["digest"]
        )
        before_gc = c.get("/v1/admin/fsck").json()
        gc_report = gc_later(env)
        after_gc = c.get("/v1/admin/fsck").json()
    server.stop()
    return {
        "campaign": "SIGKILL during pushes",
        "database": label,
        "faults_injected": restarts,
        "pushes": len(blobs),
        "pusher_threads": pushers,
        "seconds": round(seconds, 1),
        **stats,
        "lost": lost,
        "stored_twice": twice,
        "renumbered": renumbered,
        "duplicate_numbers": len(numbers) - len(set(numbers)),
        "numbers_contiguous": sorted(numbers) == list(range(1, len(numbers) + 1)),
        "bad_downloads": bad_downloads,
        "fsck_problems_after_restarts": fsck_problems,
        "fsck_ok_at_end": before_gc["ok"],
        "leftovers_before_gc": before_gc["orphan_objects"]
        + before_gc["staging_leftovers"]
        + before_gc["pending_uploads"],
        "gc": gc_report,
        "clean_after_gc": after_gc["clean"],
    }


# --- 2. S3 endpoint outages ------------------------------------------------------------------
def campaign_s3(outages: int, seed: int) -> dict:
    import logging

    import boto3
    import moto.s3.models
    from moto.server import ThreadedMotoServer

    from tests.support.harness import free_port

    moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = 1024
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    rng = random.Random(seed)
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="outage")
    data = tempfile.mkdtemp(prefix="ds-s3-")
    env = {
        "DELTASTORE_DATA_DIR": data,
        "DELTASTORE_BLOB_URL": "s3://outage/reg",
        "DELTASTORE_S3_ENDPOINT_URL": endpoint,
        "DELTASTORE_S3_MAX_ATTEMPTS": "2",
        "DELTASTORE_MULTIPART_THRESHOLD": str(256 << 10),
        "DELTASTORE_MULTIPART_PART_SIZE": str(128 << 10),
    }
    migrate(env)
    blobs = [
        storage_form(delta_bytes(60_000 + i, rows=256 if i % 2 else 2048, width_bytes=512)) for i in range(40)
    ]
    stats = {"attempts": 0, "errors_seen": {}, "server_errors": 0, "pulls": 0, "pull_failures": 0}
    lock = threading.Lock()
    done = threading.Event()
    with RegistryProcess(env, log_path=Path(data) / "server.log") as server:
        with server.client() as c:
            setup_repo(c, "s3/outage")
        queue = list(blobs)

        def note(kind: str) -> None:
            with lock:
                stats["errors_seen"][kind] = stats["errors_seen"].get(kind, 0) + 1

        def pusher() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    blob = queue.pop()
                for _ in range(200):
                    with lock:
                        stats["attempts"] += 1
                    try:
                        with server.client(timeout=60) as c:
                            r = http_push(c, "s3/outage", blob)
                    except httpx.HTTPError as exc:
                        note(type(exc).__name__)
                        time.sleep(0.2)
                        continue
                    if r.status_code == 201:
                        break
                    if r.status_code >= 500:
                        code = (
                            r.json().get("error", {}).get("code", "?")
                            if r.headers.get("content-type", "").startswith("application/json")
                            else "?"
                        )
                        note(f"{r.status_code} {code}")
                        if r.status_code != 502:
                            with lock:
                                stats["server_errors"] += 1
                    else:
                        note(str(r.status_code))
                    time.sleep(0.2)

        def puller() -> None:
            while not done.is_set():
                try:
                    with server.client(timeout=30) as c:
                        r = c.get("/v1/repos/s3/outage/versions/latest/download", follow_redirects=False)
                        if r.status_code == 307:
                            got = httpx.get(r.headers["location"], timeout=30)
                            ok = (
                                got.status_code == 200
                                and sha256(got.content) == r.headers["x-deltastore-digest"]
                            )
                        else:
                            ok = r.status_code == 404  # nothing pushed yet
                except httpx.HTTPError:
                    ok = False
                with lock:
                    stats["pulls"] += 1
                    stats["pull_failures"] += not ok
                time.sleep(0.05)

        threads = [threading.Thread(target=pusher) for _ in range(4)] + [threading.Thread(target=puller)]
        for t in threads:
            t.start()
        injected = 0
        for _ in range(outages):
            time.sleep(rng.uniform(0.3, 1.0))
            moto.stop()
            injected += 1
            time.sleep(rng.uniform(0.3, 1.5))
            moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            moto.start()
        for t in threads[:4]:
            t.join(600)
        done.set()
        threads[4].join()
        with server.client(timeout=300) as c:
            items = listed(c, "s3/outage")
            fsck = c.get("/v1/admin/fsck").json()
        gc_report = gc_later(env)
        with server.client(timeout=300) as c:
            clean = c.get("/v1/admin/fsck").json()["clean"]
    moto.stop()
    digests = [v["digest"] for v in items]
    return {
        "campaign": "S3 endpoint stopped during pushes and pulls",
        "faults_injected": injected,
        "pushes": len(blobs),
        **stats,
        "lost": sum(1 for b in blobs if b.digest not in digests),
        "stored_twice": len(digests) - len(set(digests)),
        "fsck_ok": fsck["ok"],
        "gc": gc_report,
        "clean_after_gc": clean,
    }


# --- 3. PostgreSQL restarts ------------------------------------------------------------------
def campaign_pg(restarts: int, seed: int) -> dict:
    rng = random.Random(seed)
    cluster = PostgresCluster().init()
    try:
        data = tempfile.mkdtemp(prefix="ds-pgr-")
        env = {"DELTASTORE_DATA_DIR": data, "DELTASTORE_DATABASE_URL": cluster.url}
        migrate(env)
        statuses: dict[int, int] = {}
        events: list[tuple[float, int]] = []
        lock = threading.Lock()
        stop = threading.Event()
        pushed: list[int] = []
        with RegistryProcess(env, log_path=Path(data) / "server.log") as server:
            with server.client() as c:
                setup_repo(c, "pg/load")
                assert http_push(c, "pg/load", storage_form(delta_bytes(70_000))).status_code == 201

            def reader() -> None:
                with server.client(timeout=30) as c:
                    while not stop.is_set():
                        try:
                            s = c.get("/v1/repos/pg/load/versions/latest").status_code
                        except httpx.HTTPError:
                            s = -1
                        with lock:
                            statuses[s] = statuses.get(s, 0) + 1
                            events.append((time.monotonic(), s))

            def writer() -> None:
                i = 0
                with server.client(timeout=30) as c:
                    while not stop.is_set():
                        i += 1
                        try:
                            r = http_push(c, "pg/load", storage_form(delta_bytes(70_001 + i)))
                            with lock:
                                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                                if r.status_code == 201:
                                    pushed.append(r.json()["number"])
                        except httpx.HTTPError:
                            pass

            threads = [threading.Thread(target=reader) for _ in range(4)] + [
                threading.Thread(target=writer) for _ in range(2)
            ]
            for t in threads:
                t.start()
            windows, recoveries = [], []
            for k in range(restarts):
                time.sleep(rng.uniform(0.5, 1.5))
                mode = "immediate" if k % 2 else "fast"
                t_stop = time.monotonic()
                cluster.stop(mode)
                time.sleep(rng.uniform(0.5, 2.0))
                cluster.start()
                t_back = time.monotonic()
                deadline = t_back + 30
                while time.monotonic() < deadline:
                    with lock:
                        ok_after = [t for t, s in events if t > t_back and s == 200]
                    if ok_after:
                        recoveries.append(ok_after[0] - t_back)
                        windows.append(ok_after[0] - t_stop)
                        break
                    time.sleep(0.02)
                else:
                    recoveries.append(float("inf"))
            time.sleep(1.0)
            stop.set()
            for t in threads:
                t.join()
            alive = server.proc.poll() is None
            with server.client(timeout=120) as c:
                items = listed(c, "pg/load")
                fsck = c.get("/v1/admin/fsck").json()
            tracebacks = (Path(data) / "server.log").read_text().count("Traceback")
        numbers = sorted(v["number"] for v in items)
        return {
            "campaign": "PostgreSQL restarted under load",
            "faults_injected": restarts,
            "requests": sum(statuses.values()),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "server_errors_500": statuses.get(500, 0),
            "max_outage_window_s": round(max(windows), 2) if windows else None,
            "max_recovery_after_db_back_s": round(max(recoveries), 2) if recoveries else None,
            "server_restarted": not alive,
            "pushes_confirmed": len(pushed),
            "lost": len(set(pushed) - set(numbers)),
            "numbers_contiguous": numbers == list(range(1, len(numbers) + 1)),
            "fsck_ok": fsck["ok"],
            "tracebacks_in_log": tracebacks,
        }
    finally:
        cluster.destroy()


# --- 4. disk full ----------------------------------------------------------------------------
def campaign_disk(rounds: int) -> dict:
    if os.geteuid() != 0:
        return {"campaign": "disk full", "skipped": "needs root to mount a tmpfs"}
    mount = Path(tempfile.mkdtemp(prefix="ds-full-"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)]).returncode != 0:
        return {"campaign": "disk full", "skipped": "cannot mount a tmpfs"}
    try:
        data = tempfile.mkdtemp(prefix="ds-full-data-")
        env = {"DELTASTORE_DATA_DIR": data, "DELTASTORE_BLOB_URL": mount.as_uri()}
        migrate(env)
        refused = accepted = partial_files = corrupt = 0
        with (
            RegistryProcess(env, log_path=Path(data) / "server.log") as server,
            server.client(timeout=120) as c,
        ):
            setup_repo(c, "disk/full")
            for k in range(rounds):
                # fill: 6 MiB deltas until the disk refuses one
                for i in range(10):
                    blob = storage_form(delta_bytes(80_000 + k * 100 + i, rows=768, width_bytes=8 << 10))
                    upload = c.post("/v1/repos/disk/full/uploads", json=blob.declaration()).json()
                    r = c.put(upload["upload_url"], content=blob.data)
                    if r.status_code == 507:
                        refused += 1
                        partial_files += len(list((mount / "staging").iterdir()))
                        c.delete(f"/v1/uploads/{upload['id']}")
                        break
                    assert r.status_code == 200, r.text
                    assert c.post(upload["complete_url"]).status_code == 201
                    accepted += 1
                fsck = c.get("/v1/admin/fsck").json()
                corrupt += fsck["digest_mismatches"] + fsck["missing_objects"]
                # make room: delete every version, collect
                for v in listed(c, "disk/full"):
                    c.delete(f"/v1/repos/disk/full/versions/{v['number']}")
                gc_later(env)
            clean = c.get("/v1/admin/fsck").json()["clean"]
        return {
            "campaign": "disk full (16 MiB tmpfs)",
            "faults_injected": refused,
            "rounds": rounds,
            "accepted_pushes": accepted,
            "refused_507": refused,
            "partial_files_left": partial_files,
            "corrupt_or_missing_blobs": corrupt,
            "clean_at_end": clean,
        }
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["kill", "s3", "pg", "disk"])
    parser.add_argument("--kills", type=int, default=30, help="SIGKILLs per database")
    parser.add_argument("--pushers", type=int, default=8)
    parser.add_argument("--per-pusher", type=int, default=25)
    parser.add_argument("--outages", type=int, default=10)
    parser.add_argument("--pg-restarts", type=int, default=10)
    parser.add_argument("--disk-rounds", type=int, default=5)
    parser.add_argument("--pg-url", default=os.environ.get("DELTASTORE_TEST_PG_URL"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    if args.only in (None, "kill"):
        emit(
            campaign_kill(
                f"sqlite:///{tempfile.mkdtemp(prefix='ds-kill-db-')}/registry.db",
                "sqlite",
                args.kills,
                args.pushers,
                args.per_pusher,
                args.seed,
            )
        )
        if args.pg_url:
            from sqlalchemy import create_engine, text
            from sqlalchemy.engine import make_url

            name = f"ds_kill_{uuid.uuid4().hex[:8]}"
            admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            try:
                emit(
                    campaign_kill(
                        make_url(args.pg_url).set(database=name).render_as_string(hide_password=False),
                        "postgres",
                        args.kills,
                        args.pushers,
                        args.per_pusher,
                        args.seed + 1,
                    )
                )
            finally:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    if args.only in (None, "s3"):
        emit(campaign_s3(args.outages, args.seed))
    if args.only in (None, "pg"):
        why = postgres_available()
        emit(
            campaign_pg(args.pg_restarts, args.seed)
            if why is None
            else {"campaign": "PostgreSQL restarts", "skipped": why}
        )
    if args.only in (None, "disk"):
        emit(campaign_disk(args.disk_rounds))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
