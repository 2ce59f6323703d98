"""Concurrent push and read load against a running registry, shared by tests/reliability/test_load.py
(a short run) and bench/reliability_load.py (8 pushers x 50 versions, 10,000 stored deltas).

    result = push_load(url, pushers=8, per_pusher=50, same_repo=True)
    check_pushes(url, result)          # no lost or duplicate numbers, every blob's digest verified
"""

from __future__ import annotations

import hashlib
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from tests.support.corpus import StoredDelta, delta_bytes, storage_form
from tests.support.harness import http_push, setup_repo


@dataclass
class PushLoad:
    pushes: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: repo -> {digest: version number} as the pushers' 201 answers said
    confirmed: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.pushes / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def make_blobs(count: int, *, offset: int = 0, rows: int = 64, width_bytes: int = 256) -> list[StoredDelta]:
    return [storage_form(delta_bytes(offset + i, rows=rows, width_bytes=width_bytes)) for i in range(count)]


def push_load(
    url: str,
    *,
    pushers: int,
    per_pusher: int,
    same_repo: bool,
    blob_offset: int = 0,
    namespace: str = "load",
    time_limit: float = 600.0,
) -> PushLoad:
    """`pushers` threads each push `per_pusher` distinct deltas, into one repository or one each."""
    repos = [f"{namespace}/shared"] if same_repo else [f"{namespace}/r{i}" for i in range(pushers)]
    with httpx.Client(base_url=url, timeout=60) as c:
        for repo in repos:
            setup_repo(c, repo)
    blobs = make_blobs(pushers * per_pusher, offset=blob_offset)
    result = PushLoad(confirmed={repo: {} for repo in repos})
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit

    def pusher(i: int) -> None:
        repo = repos[0] if same_repo else repos[i]
        with httpx.Client(base_url=url, timeout=120) as c:
            for blob in blobs[i * per_pusher : (i + 1) * per_pusher]:
                if time.monotonic() > deadline:
                    with lock:
                        result.errors.append("time limit reached")
                    return
                t0 = time.perf_counter()
                try:
                    r = http_push(c, repo, blob)
                except httpx.HTTPError as exc:
                    with lock:
                        result.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 201:
                        result.pushes += 1
                        result.latencies.append(dt)
                        result.confirmed[repo][blob.digest] = r.json()["number"]
                    else:
                        result.errors.append(f"{r.status_code}: {r.text[:200]}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(pushers) as pool:
        list(pool.map(pusher, range(pushers)))
    result.seconds = time.perf_counter() - t0
    return result


def check_pushes(url: str, load: PushLoad, *, download: bool = True) -> dict:
    """Every confirmed push is listed once under its number; numbers are 1..N without gaps or
    duplicates; every blob downloads with its digest; fsck re-verifies every stored blob."""
    lost = duplicates = mismatched = verified = 0
    with httpx.Client(base_url=url, timeout=300) as c:
        for repo, confirmed in load.confirmed.items():
            items, cursor = [], None
            while True:
                page = c.get(
                    f"/v1/repos/{repo}/versions",
                    params={"limit": 500, **({"cursor": cursor} if cursor else {})},
                ).json()
                items += page["items"]
                cursor = page["next_cursor"]
                if not cursor:
                    break
            numbers = [v["number"] for v in items]
            duplicates += len(numbers) - len(set(numbers))
            if sorted(numbers) != list(range(1, len(numbers) + 1)):
                duplicates += 1  # a gap or a reused number
            listed = {v["digest"]: v["number"] for v in items}
            lost += sum(1 for digest, number in confirmed.items() if listed.get(digest) != number)
            if download:
                for v in items:
                    r = c.get(f"/v1/repos/{repo}/versions/{v['number']}/download")
                    if (
                        r.status_code != 200
                        or "sha256:" + hashlib.sha256(r.content).hexdigest() != v["digest"]
                    ):
                        mismatched += 1
                    verified += 1
        fsck = c.get("/v1/admin/fsck").json()
    return {
        "lost": lost,
        "duplicates": duplicates,
        "download_mismatches": mismatched,
        "downloads_verified": verified,
        "fsck_ok": fsck["ok"],
        "fsck_digest_mismatches": fsck["digest_mismatches"],
        "fsck_bytes_verified": fsck["bytes_verified"],
        "fsck_blobs": fsck["blobs"],
    }


@dataclass
class ReadLoad:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)

    def summary(self) -> dict:
        everything = [x for values in self.latencies.values() for x in values]
        return {
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 2),
            "requests_per_second": round(self.requests / self.seconds, 1) if self.seconds else 0,
            "p50_ms": round(percentile(everything, 0.5) * 1000, 2),
            "p99_ms": round(percentile(everything, 0.99) * 1000, 2),
            "by_operation": {
                op: {
                    "n": len(v),
                    "p50_ms": round(percentile(v, 0.5) * 1000, 2),
                    "p99_ms": round(percentile(v, 0.99) * 1000, 2),
                }
                for op, v in self.latencies.items()
            },
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
        }


def read_load(
    url: str,
    repos: list[tuple[str, int]],
    *,
    requests: int,
    concurrency: int,
    time_limit: float,
    seed: int = 0,
) -> ReadLoad:
    """A bounded mix of list / show / download-metadata (HEAD) requests over `repos` ((name, versions))."""
    rng = random.Random(seed)
    plan = []
    for _ in range(requests):
        repo, n = rng.choice(repos)
        number = rng.randint(1, n)
        op = rng.choice(["list repos", "list versions", "show version", "show latest", "download metadata"])
        path = {
            "list repos": f"/v1/repos?namespace={repo.split('/')[0]}&limit=50",
            "list versions": f"/v1/repos/{repo}/versions?limit=50",
            "show version": f"/v1/repos/{repo}/versions/{number}",
            "show latest": f"/v1/repos/{repo}/versions/latest",
            "download metadata": f"/v1/repos/{repo}/versions/{number}/download",
        }[op]
        plan.append((op, "HEAD" if op == "download metadata" else "GET", path))
    result = ReadLoad(latencies={op: [] for op in {p[0] for p in plan}})
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit
    chunks = [plan[i::concurrency] for i in range(concurrency)]

    def worker(chunk) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            for op, method, path in chunk:
                if time.monotonic() > deadline:
                    return
                t0 = time.perf_counter()
                try:
                    status = c.request(method, path).status_code
                except httpx.HTTPError:
                    status = -1
                dt = time.perf_counter() - t0
                with lock:
                    result.requests += 1
                    result.statuses[status] = result.statuses.get(status, 0) + 1
                    if status == 200:
                        result.latencies[op].append(dt)
                    else:
                        result.errors += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, chunks))
    result.seconds = time.perf_counter() - t0
    return result


def summarize_pushes(load: PushLoad) -> dict:
    return {
        "pushes": load.pushes,
        "seconds": round(load.seconds, 2),
        "pushes_per_second": round(load.per_second, 1),
        "p50_ms": round(percentile(load.latencies, 0.5) * 1000, 1),
        "p99_ms": round(percentile(load.latencies, 0.99) * 1000, 1),
        "mean_ms": round(statistics.fmean(load.latencies) * 1000, 1) if load.latencies else None,
        "errors": len(load.errors),
        "first_errors": load.errors[:3],
    }
