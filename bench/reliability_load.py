"""Reliability under load (not a test; prints tables and writes JSON).

1. Push load: 8 concurrent pushers x 50 versions, into one repository and into one repository
   each, on SQLite (WAL) and PostgreSQL; afterwards every number is checked (none lost, none
   duplicated, no gap), every blob downloaded and its digest checked, and fsck re-verifies the store.
2. Read load at 10,000 stored deltas (pushed through the API): list / show / download-metadata
   requests from a second process, bounded in count and time; p50 / p99 latency and requests/s.

    nice -n 10 python bench/reliability_load.py                  # PostgreSQL if DELTASTORE_TEST_PG_URL is set
    python bench/reliability_load.py --pushers 8 --per-pusher 50 --stored 10000 --requests 20000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.harness import RegistryProcess  # noqa: E402
from tests.support.live_registry import fresh_database, migrate  # noqa: E402
from tests.support.load import check_pushes, push_load, summarize_pushes  # noqa: E402


def database(kind: str, pg_url: str | None):
    """A fresh SQLite or PostgreSQL database (dropped afterwards) for one run."""
    return fresh_database(
        kind, sqlite_dir=tempfile.mkdtemp(prefix="ds-load-"), admin_url=pg_url, prefix="ds_load"
    )


@contextmanager
def registry(database_url: str):
    data = tempfile.mkdtemp(prefix="ds-load-data-")
    env = {"DELTASTORE_DATA_DIR": data, "DELTASTORE_DATABASE_URL": migrate(database_url)}
    with RegistryProcess(env, log_path=Path(data) / "server.log") as server:
        yield server


def bench_pushes(kinds: list[str], pg_url: str | None, pushers: int, per_pusher: int) -> list[dict]:
    rows = []
    for kind in kinds:
        for same_repo in (True, False):
            with database(kind, pg_url) as url, registry(url) as server:
                load = push_load(server.url, pushers=pushers, per_pusher=per_pusher, same_repo=same_repo)
                checked = check_pushes(server.url, load)
            row = {
                "database": kind,
                "target": "one repository" if same_repo else "one repository each",
                "pushers": pushers,
                "per_pusher": per_pusher,
                **summarize_pushes(load),
                **checked,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_reads(
    kind: str, pg_url: str | None, stored: int, requests: int, concurrency: int, time_limit: float
) -> dict:
    repos_n, per_repo = max(1, stored // 50), 50
    with database(kind, pg_url) as url, registry(url) as server:
        t0 = time.perf_counter()
        # 10,000 real deltas, pushed through the API by 8 pushers (one repository each at a time)
        pushed = 0
        batch = 8
        for start in range(0, repos_n, batch):
            n = min(batch, repos_n - start)
            load = push_load(
                server.url,
                pushers=n,
                per_pusher=per_repo,
                same_repo=False,
                namespace=f"ns{start // batch}",
                blob_offset=1_000_000 + start * per_repo,
            )
            assert not load.errors, load.errors[:3]
            pushed += load.pushes
        fill_seconds = time.perf_counter() - t0
        repos = [(f"ns{i // batch}/r{i % batch}", per_repo) for i in range(repos_n)]
        code = (
            "import json, sys; from tests.support.load import read_load; "
            f"r = read_load({server.url!r}, {repos!r}, requests={requests}, "
            f"concurrency={concurrency}, time_limit={time_limit}); "
            "print(json.dumps(r.summary()))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=time_limit + 120
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        summary = json.loads(proc.stdout)
        import httpx

        fsck = httpx.get(server.url + "/v1/admin/fsck", params={"digests": "true"}, timeout=600).json()
    row = {
        "database": kind,
        "stored_deltas": pushed,
        "fill_seconds": round(fill_seconds, 1),
        "fill_pushes_per_second": round(pushed / fill_seconds, 1),
        "concurrency": concurrency,
        **summary,
        "fsck_ok": fsck["ok"],
        "fsck_blobs": fsck["blobs"],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["push", "read"])
    parser.add_argument("--pushers", type=int, default=8)
    parser.add_argument("--per-pusher", type=int, default=50)
    parser.add_argument("--stored", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=300)
    parser.add_argument("--pg-url", default=os.environ.get("DELTASTORE_TEST_PG_URL"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    kinds = ["sqlite"] + (["postgres"] if args.pg_url else [])
    results: dict = {}
    if args.only in (None, "push"):
        results["push"] = bench_pushes(kinds, args.pg_url, args.pushers, args.per_pusher)
        print(
            f"\npush load: {args.pushers} pushers x {args.per_pusher} "
            "versions (uvicorn, one worker, loopback)"
        )
        print(
            f"{'db':<9} {'target':<22} {'pushes':>6} {'push/s':>7} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'lost':>5} {'dup':>4} "
            f"{'digest bad':>10} {'fsck':>5}   goal: lost = dup = bad = 0"
        )
        for r in results["push"]:
            print(
                f"{r['database']:<9} {r['target']:<22} {r['pushes']:>6} "
                f"{r['pushes_per_second']:>7} {r['p50_ms']:>7} "
                f"{r['p99_ms']:>7} {r['lost']:>5} {r['duplicates']:>4} "
                f"{r['download_mismatches'] + r['fsck_digest_mismatches']:>10} "
                f"{'ok' if r['fsck_ok'] else 'BAD':>5}"
            )
    if args.only in (None, "read"):
        results["read"] = [
            bench_reads(kind, args.pg_url, args.stored, args.requests, args.concurrency, args.time_limit)
            for kind in kinds
        ]
        print(
            f"\nread load from a second process: {args.requests} requests, {args.concurrency} connections, "
            f"at {args.stored} stored deltas"
        )
        print(
            f"{'db':<9} {'stored':>7} {'req/s':>7} {'p50 ms':>7} "
            f"{'p99 ms':>7} {'errors':>7}   goal: errors = 0"
        )
        for r in results["read"]:
            print(
                f"{r['database']:<9} {r['stored_deltas']:>7} {r['requests_per_second']:>7} {r['p50_ms']:>7} "
                f"{r['p99_ms']:>7} {r['errors']:>7}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
