"""Web page benchmark (not a test): server time of the registry's pages for a repository with
1,000 versions, printed beside the JSON API's time for the same listing (goal: < 100 ms a page).

The registry runs under uvicorn in its own process on loopback (SQLite, local blobs); versions
are pushed over the real two-phase protocol. Each figure is p50 / p95 of N requests timed by
the client over loopback (an upper bound of the server's time; GET /healthz in the same run
shows what the round trip itself costs), page and API requests alternating so machine load
hits both alike.

    python bench/web_bench.py [--versions 1000] [--requests 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.registry.server.web.catalog import LLAMA, delta, fidelity  # noqa: E402
from tests.registry.server.web.catalog import push as push_delta  # noqa: E402
from tests.support.harness import RegistryProcess, migrate  # noqa: E402

BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


def fill(client, versions: int) -> None:
    client.post(
        "/v1/bases",
        json={
            "name": LLAMA[0],
            "fingerprint": LLAMA[1],
            "architecture": "LlamaForCausalLM",
            "parameter_count": 1_100_000_000,
        },
    )
    client.post(
        "/v1/repos",
        json={
            "namespace": "acme",
            "name": "big",
            "base": LLAMA[0],
            "description": "a repository with many versions",
        },
    )
    for i in range(20):  # neighbours on the base page
        client.post("/v1/repos", json={"namespace": "acme", "name": f"other-{i}", "base": LLAMA[0]})
    raws = [
        delta(
            LLAMA, i, planes=1 + i % 2, fidelity={**fidelity(i % 5), "gain_recovered": 0.8 + (i % 97) / 500}
        )
        for i in range(versions)
    ]
    # pushes to one repository serialize on its row; a few in flight keep the server busy
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda raw: push_delta(client, "acme/big", raw), raws))
    client.put("/v1/repos/acme/big/tags/prod", json={"version": versions // 2})


def timed(client, path: str, headers: dict | None = None) -> float:
    start = time.perf_counter()
    r = client.get(path, headers=headers)
    elapsed = (time.perf_counter() - start) * 1000
    assert r.status_code == 200, (path, r.status_code, r.text[:300])
    return elapsed


def figure(samples: list[float]) -> str:
    ordered = sorted(samples)
    return f"{statistics.median(ordered):.1f} / {ordered[int(len(ordered) * 0.95) - 1]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            "DELTASTORE_DATA_DIR": f"{tmp}/data",
            "DELTASTORE_DATABASE_URL": f"sqlite:///{tmp}/registry.db",
        }
        Path(tmp, "data").mkdir()
        migrate(env)
        with RegistryProcess(env, log_path=Path(tmp) / "registry.log") as server, server.client() as client:
            started = time.perf_counter()
            fill(client, args.versions)
            print(
                f"pushed {args.versions} versions in {time.perf_counter() - started:.1f} s", file=sys.stderr
            )
            middle = args.versions // 2
            pairs = [  # (what, page path, API path of the same data)
                (
                    "repository (50 versions + chart of all)",
                    "/acme/big",
                    "/v1/repos/acme/big/versions?limit=50",
                ),
                (
                    "version page (metadata + tensors)",
                    f"/acme/big@{middle}",
                    f"/v1/repos/acme/big/versions/{middle}",
                ),
                (
                    "base page, sorted by size",
                    "/bases/org/llama-tiny?sort=size",
                    "/v1/bases/org/llama-tiny/repos",
                ),
                ("bases", "/", "/v1/bases"),
            ]
            for _, page, api in pairs:  # warm-up: imports, template compilation, header cache
                for _ in range(3):
                    timed(client, page, BROWSER)
                    timed(client, api)
            results = {what: ([], []) for what, _, _ in pairs}
            loopback = []
            for _ in range(args.requests):
                for what, page, api in pairs:
                    results[what][0].append(timed(client, page, BROWSER))
                    results[what][1].append(timed(client, api))
                loopback.append(timed(client, "/healthz"))
            all_versions = [timed(client, "/v1/repos/acme/big/versions?limit=500") for _ in range(10)]
    print(
        f"\n{args.versions} versions in one repository; p50 / p95 ms of {args.requests} requests each, "
        f"over HTTP on loopback (GET /healthz: {figure(loopback)} ms)\n"
    )
    print("| page | page ms | JSON API, same data, ms | page / API | goal |")
    print("| --- | --- | --- | --- | --- |")
    for what, page, api in pairs:
        ours, peer = results[what]
        ratio = statistics.median(ours) / statistics.median(peer)
        print(f"| {what} (`{page}` vs `{api}`) | {figure(ours)} | {figure(peer)} | {ratio:.2f} | < 100 ms |")
    print(f"\nfor scale: the API's largest page, 500 versions as JSON: {figure(all_versions)} ms")


if __name__ == "__main__":
    main()
