"""Registry benchmarks (not tests); prints tables with the peer beside our figure.

1. Push / pull of a 200 MB delta through the registry to an S3 endpoint (moto's server on
   loopback) against raw boto3 upload / download of the same bytes to the same endpoint.
2. List / show latency (p50, p99) with 10,000 versions across 20 bases, SQLite and PostgreSQL.

    python bench/registry_bench.py                    # both; PostgreSQL if DELTASTORE_TEST_PG_URL is set
    python bench/registry_bench.py --only latency --size-mb 50
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from codec.storage import compress_blob  # noqa: E402

FINGERPRINT = "sha256:" + "5a" * 32
BASE = "bench/base"


def _part_targets(api: httpx.Client, upload: dict, size: int) -> list[dict]:
    """Where each byte range of an upload goes: its one presigned PUT, or its parts' URLs (asked
    for in batches, as a client does)."""
    if upload["method"] != "s3-multipart":
        return [{"url": upload["upload_url"], "offset": 0, "size": size}]
    part_size, count, urls = upload["part_size"], max(1, -(-size // upload["part_size"])), []
    while len(urls) < count:
        params = {"first": len(urls) + 1, "count": min(100, count - len(urls))}
        urls += [p["url"] for p in api.get(upload["parts_url"], params=params).json()["parts"]]
    return [
        {"url": url, "offset": i * part_size, "size": min(part_size, size - i * part_size)}
        for i, url in enumerate(urls)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextmanager
def process(args: list[str], env: dict | None = None, ready_url: str | None = None):
    proc = subprocess.Popen(
        args, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        if ready_url:
            wait_http(ready_url)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@contextmanager
def moto_server():
    port = free_port()
    with process(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        ready_url=f"http://127.0.0.1:{port}/moto-api/",
    ):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def registry_server(env: dict):
    from registry.server.db import create_db_engine
    from registry.server.migrate import upgrade
    from registry.server.settings import Settings

    engine = create_db_engine(
        Settings(**{k.removeprefix("DELTASTORE_").lower(): v for k, v in env.items()}).resolved_database_url
    )
    upgrade(engine)
    engine.dispose()
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "registry.server.app:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    with process(args, env={**env, "PYTHONPATH": str(ROOT)}, ready_url=f"http://127.0.0.1:{port}/healthz"):
        yield f"http://127.0.0.1:{port}"


# --- a synthetic format-v1 delta of a given size (random signs: incompressible, like real ones) ---
def make_delta(path: Path, size_mb: int, seed: int = 0) -> Path:
    rows = 4096
    cols_bytes = size_mb * (1 << 20) // rows
    n = rows * cols_bytes
    header = {
        "__metadata__": {
            "format": "deltastore.delta",
            "format_version": "1",
            "codec": "bitdelta",
            "base_model": BASE,
            "base_fingerprint": FINGERPRINT,
            "dtype": "float16",
            "x-planes": "1",
            "x-finetuned-bytes": str(n * 16),
        },
        "model.w.scale": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]},
        "model.w.sign": {"dtype": "U8", "shape": [1, rows, cols_bytes], "data_offsets": [4, 4 + n]},
    }
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = random.Random(seed)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob + struct.pack("<f", 0.01))
        left = n
        while left:
            chunk = min(left, 8 << 20)
            fh.write(rng.randbytes(chunk))
            left -= chunk
    return path


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- 1. push / pull through the registry vs raw boto3 ------------------------------------------
def bench_transfer(size_mb: int, repeat: int) -> list[tuple]:
    import boto3

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    work = Path(tempfile.mkdtemp(prefix="ds-bench-"))
    raw = make_delta(work / "big.bdelta", size_mb)
    info = compress_blob(raw, work / "big.bdelta.zst")
    blob_path = work / "big.bdelta.zst"
    # the version that pull rounds download holds other bytes, so that push rounds never deduplicate
    pull_info = compress_blob(make_delta(work / "pull.bdelta", size_mb, seed=1), work / "pull.bdelta.zst")
    pull_path = work / "pull.bdelta.zst"
    rows = []
    with moto_server() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        env = {
            "DELTASTORE_DATA_DIR": str(work / "data"),
            "DELTASTORE_BLOB_URL": "s3://bench/registry",
            "DELTASTORE_S3_ENDPOINT_URL": endpoint,
            "DELTASTORE_UPLOAD_TTL_SECONDS": "3600",
        }
        with (
            registry_server(env) as url,
            httpx.Client(base_url=url, timeout=600) as api,
            httpx.Client(timeout=600) as s3http,
        ):
            api.post("/v1/bases", json={"name": BASE, "fingerprint": FINGERPRINT}).raise_for_status()
            declaration = {
                "digest": info.digest,
                "size": info.size,
                "raw_digest": info.raw_digest,
                "raw_size": info.raw_size,
            }

            last_repo: list[str] = []

            def registry_push() -> float:
                """Returns the time spent in `complete` (the server's verification)."""
                repo = f"r{uuid.uuid4().hex[:8]}"
                last_repo[:] = [repo]
                api.post(
                    "/v1/repos", json={"namespace": "bench", "name": repo, "base": BASE}
                ).raise_for_status()
                upload = api.post(f"/v1/repos/bench/{repo}/uploads", json=declaration).json()
                assert not upload["exists"]
                parts = _part_targets(api, upload, info.size)

                def put(part):
                    with open(blob_path, "rb") as fh:
                        fh.seek(part["offset"])
                        s3http.put(part["url"], content=fh.read(part["size"])).raise_for_status()

                with ThreadPoolExecutor(max_workers=10) as pool:  # boto3's default concurrency
                    list(pool.map(put, parts))
                t0 = time.perf_counter()
                api.post(upload["complete_url"]).raise_for_status()
                return time.perf_counter() - t0

            def registry_pull() -> None:
                r = api.get("/v1/repos/bench/pull/versions/latest/download", follow_redirects=False)
                sha = hashlib.sha256()
                with s3http.stream("GET", r.headers["location"]) as resp, open(work / "pulled", "wb") as fh:
                    for chunk in resp.iter_bytes(1 << 20):
                        sha.update(chunk)
                        fh.write(chunk)
                assert "sha256:" + sha.hexdigest() == pull_info.digest

            raw_key = "raw/pull-source"
            s3.upload_file(str(pull_path), "bench", raw_key)
            api.post(
                "/v1/repos", json={"namespace": "bench", "name": "pull", "base": BASE}
            ).raise_for_status()
            pull_declaration = {
                "digest": pull_info.digest,
                "size": pull_info.size,
                "raw_digest": pull_info.raw_digest,
                "raw_size": pull_info.raw_size,
            }
            upload = api.post("/v1/repos/bench/pull/uploads", json=pull_declaration).json()
            for part in _part_targets(api, upload, pull_info.size):
                with open(pull_path, "rb") as fh:
                    fh.seek(part["offset"])
                    s3http.put(part["url"], content=fh.read(part["size"])).raise_for_status()
            api.post(upload["complete_url"]).raise_for_status()

            # rounds interleave ours and the peer's so that both see the same machine load
            push_t, complete_t, raw_up_t, pull_t, raw_down_t = [], [], [], [], []
            for _ in range(repeat):
                t0 = time.perf_counter()
                complete_t.append(registry_push())
                push_t.append(time.perf_counter() - t0)
                api.delete(f"/v1/repos/bench/{last_repo[0]}")
                raw_up_t.append(
                    timed(lambda: s3.upload_file(str(blob_path), "bench", f"raw/{uuid.uuid4().hex}"), 1)
                )
                pull_t.append(timed(registry_pull, 1))
                raw_down_t.append(
                    timed(lambda: s3.download_file("bench", raw_key, str(work / "pulled-raw")), 1)
                )
                _gc(env)
    med = statistics.median
    mb = info.size / 1e6
    rows.append(
        (
            "push",
            mb,
            med(push_t),
            med(raw_up_t),
            f"of which complete (server verifies) {med(complete_t):.2f} s",
        )
    )
    rows.append(("pull", mb, med(pull_t), med(raw_down_t), ""))
    return rows


def _gc(env: dict) -> None:
    import datetime as dt

    from registry.server.blobstores import open_blob_store
    from registry.server.db import Database
    from registry.server.gc import collect_garbage
    from registry.server.models import utcnow
    from registry.server.settings import Settings

    settings = Settings(**{k.removeprefix("DELTASTORE_").lower(): v for k, v in env.items()})
    db = Database.from_url(settings.resolved_database_url)
    collect_garbage(
        db=db, store=open_blob_store(settings), settings=settings, now=utcnow() + dt.timedelta(days=2)
    )
    db.dispose()


# --- 2. list / show latency ------------------------------------------------------------------
def populate(
    database_url: str, *, bases: int, repos_per_base: int, versions_per_repo: int
) -> list[tuple[str, str]]:
    from sqlalchemy import insert

    from registry.server.db import Database
    from registry.server.migrate import upgrade
    from registry.server.models import BaseModel, Blob, Repository, Tag, Version, utcnow

    db = Database.from_url(database_url)
    upgrade(db.engine)
    now = utcnow()
    repos = []
    with db.write() as s:
        s.execute(
            insert(BaseModel),
            [
                {
                    "id": b + 1,
                    "name": f"org{b}/base{b}",
                    "fingerprint": "sha256:" + f"{b:064x}",
                    "created_by": "bench",
                    "created_at": now,
                }
                for b in range(bases)
            ],
        )
        repo_rows, blob_rows, version_rows, tag_rows = [], [], [], []
        vid = 0
        for b in range(bases):
            for r in range(repos_per_base):
                rid = b * repos_per_base + r + 1
                repos.append((f"ns{b}", f"delta-{r}"))
                repo_rows.append(
                    {
                        "id": rid,
                        "namespace": f"ns{b}",
                        "name": f"delta-{r}",
                        "base_model_id": b + 1,
                        "description": "",
                        "visibility": "public",
                        "next_version": versions_per_repo + 1,
                        "created_by": "bench",
                        "created_at": now,
                    }
                )
                for n in range(1, versions_per_repo + 1):
                    vid += 1
                    digest = "sha256:" + hashlib.sha256(str(vid).encode()).hexdigest()
                    blob_rows.append(
                        {
                            "digest": digest,
                            "store_key": "sha256/" + digest[7:9] + "/" + digest[7:],
                            "size": 10_000_000,
                            "raw_digest": digest,
                            "raw_size": 20_000_000,
                            "created_at": now,
                        }
                    )
                    version_rows.append(
                        {
                            "id": vid,
                            "repository_id": rid,
                            "number": n,
                            "state": "ready",
                            "blob_digest": digest,
                            "codec": "bitdelta",
                            "dtype": "bfloat16",
                            "bits": 1,
                            "size_ratio": 15.9,
                            "fidelity": {"kl": 0.01},
                            "header_metadata": {"codec": "bitdelta"},
                            "description": "",
                            "created_by": "bench",
                            "created_at": now,
                            "ready_at": now,
                        }
                    )
                tag_rows.append(
                    {
                        "repository_id": rid,
                        "name": "latest",
                        "version_id": vid,
                        "updated_by": "bench",
                        "updated_at": now,
                    }
                )
        s.execute(insert(Repository), repo_rows)
        s.execute(insert(Blob), blob_rows)
        s.execute(insert(Version), version_rows)
        s.execute(insert(Tag), tag_rows)
    db.dispose()
    return repos


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def bench_latency(database_url: str, label: str, requests: int) -> list[tuple]:
    bases, per_base, per_repo = 20, 50, 10
    repos = populate(database_url, bases=bases, repos_per_base=per_base, versions_per_repo=per_repo)
    work = Path(tempfile.mkdtemp(prefix="ds-bench-lat-"))
    env = {"DELTASTORE_DATA_DIR": str(work), "DELTASTORE_DATABASE_URL": database_url}
    rng = random.Random(1)
    rows = []
    with registry_server(env) as url, httpx.Client(base_url=url, timeout=30) as c:

        def base_repos() -> str:
            b = rng.randrange(bases)
            return f"/v1/bases/org{b}/base{b}/repos?limit=50"

        ops = {
            "list repos of a base (50/page)": base_repos,
            "search repos by name": lambda: f"/v1/repos?q=delta-{rng.randrange(per_base)}&limit=50",
            "show version (latest tag)": lambda: "/v1/repos/{}/{}/versions/latest".format(*rng.choice(repos)),
            "list versions of a repo": lambda: "/v1/repos/{}/{}/versions".format(*rng.choice(repos)),
        }
        for name, make_path in ops.items():
            lat = []
            for i in range(requests + 20):
                path = make_path()
                t0 = time.perf_counter()
                r = c.get(path)
                dt_ms = (time.perf_counter() - t0) * 1000
                assert r.status_code == 200, (path, r.text)
                if i >= 20:  # warm-up
                    lat.append(dt_ms)
            rows.append((label, name, statistics.median(lat), percentile(lat, 0.99)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["transfer", "latency"])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--pg-url", default=os.environ.get("DELTASTORE_TEST_PG_URL"))
    args = parser.parse_args()

    if args.only in (None, "transfer"):
        rows = bench_transfer(args.size_mb, args.repeat)
        print(
            f"\npush/pull of a {args.size_mb} MB delta via the registry to "
            f"moto S3 (loopback), median of {args.repeat} interleaved rounds"
        )
        print(
            f"{'op':<6} {'MB':>7} {'registry s':>11} {'registry MB/s':>14} "
            f"{'raw boto3 s':>12} {'raw MB/s':>9} {'ratio':>6}  goal"
        )
        for op, mb, ours, raw, note in rows:
            print(
                f"{op:<6} {mb:>7.1f} {ours:>11.2f} {mb / ours:>14.1f} {raw:>12.2f} "
                f"{mb / raw:>9.1f} {raw / ours:>6.2f}  >= 0.90  {note}"
            )

    if args.only in (None, "latency"):
        rows = bench_latency(
            f"sqlite:///{tempfile.mkdtemp(prefix='ds-bench-sqlite-')}/registry.db", "sqlite", args.requests
        )
        if args.pg_url:
            from sqlalchemy import create_engine, text
            from sqlalchemy.engine import make_url

            name = f"ds_bench_{uuid.uuid4().hex[:8]}"
            admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            try:
                rows += bench_latency(
                    make_url(args.pg_url).set(database=name).render_as_string(hide_password=False),
                    "postgres",
                    args.requests,
                )
            finally:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        else:
            print("\n(PostgreSQL skipped: set DELTASTORE_TEST_PG_URL or --pg-url)")
        print(
            "\nlist/show latency over HTTP (uvicorn, loopback), 10,000 versions "
            f"in 1,000 repos across 20 bases, {args.requests} requests each"
        )
        print(f"{'db':<9} {'operation':<32} {'p50 ms':>7} {'p99 ms':>7}  goal p99")
        for db, op, p50, p99 in rows:
            print(f"{db:<9} {op:<32} {p50:>7.2f} {p99:>7.2f}  < 20 ms")


if __name__ == "__main__":
    main()
