"""Client benchmark (not a test): `deltactl push` and `pull` of a 200 MB delta through the
registry to moto's S3 server (presigned multipart, parallel parts) beside raw boto3 transfers
of the same bytes to the same endpoint, interleaved in one run; and the cache-hit pull.

Each figure is measured twice: the `deltactl` executable (a new process: interpreter and
imports included) and the same command's work in-process (`RegistryApi.push` / `.pull`, what
the command runs after start-up). Push = validate + zstd + sha256 of both forms + upload +
the registry's verification; pull = download + sha256 + decompress + sha256 into the cache.

    python bench/client_bench.py                 # 200 MB, 3 rounds
    python bench/client_bench.py --size-mb 50 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from registry_bench import BASE, FINGERPRINT, make_delta, moto_server, registry_server  # noqa: E402

from codec.storage import compress_blob  # noqa: E402
from registry.client.api import RegistryApi  # noqa: E402

DELTACTL = str(Path(sys.executable).with_name("deltactl"))


class PhaseClock:
    """A `registry.client.Progress` that records when each phase starts."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = [("start", time.perf_counter())]

    def start(self, phase: str, total, completed: int = 0) -> None:
        self.marks.append((phase, time.perf_counter()))

    def advance(self, n: int) -> None:
        pass

    def stop(self) -> None:
        self.marks.append(("end", time.perf_counter()))

    def durations(self) -> dict[str, float]:
        out: dict[str, float] = {}
        names = ["validate + repository check"] + [m[0] for m in self.marks[1:-1]]
        for name, (_, t0), (_, t1) in zip(names, self.marks, self.marks[1:], strict=False):
            out[name] = out.get(name, 0.0) + t1 - t0
        return out


def run_cli(*args: str, home: Path, url: str) -> float:
    env = {**os.environ, "DELTACTL_HOME": str(home), "DELTACTL_REGISTRY": url}
    t0 = time.perf_counter()
    proc = subprocess.run([DELTACTL, *args], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"deltactl {' '.join(args)} failed: {proc.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import boto3

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    work = Path(tempfile.mkdtemp(prefix="ds-client-bench-"))
    try:
        # two distinct deltas per round (one for the executable, one in-process), so no push deduplicates
        deltas = [make_delta(work / f"d{i}.bdelta", args.size_mb, seed=i) for i in range(2 * args.repeat)]
        stored = compress_blob(deltas[0], work / "peer.zst")  # the peer moves the same (stored) bytes
        t0 = time.perf_counter()
        subprocess.run([DELTACTL, "--version"], capture_output=True, check=True)
        startup = time.perf_counter() - t0

        rows: dict[str, list[float]] = {
            k: []
            for k in (
                "push proc",
                "push api",
                "push raw",
                "pull proc",
                "pull api",
                "pull raw",
                "hit proc",
                "hit api",
            )
        }
        phases: list[dict[str, float]] = []
        with moto_server() as endpoint:
            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            s3.create_bucket(Bucket="bench")
            env = {
                "DELTASTORE_DATA_DIR": str(work / "data"),
                "DELTASTORE_BLOB_URL": "s3://bench/registry",
                "DELTASTORE_S3_ENDPOINT_URL": endpoint,
            }
            with registry_server(env) as url:
                httpx.post(
                    f"{url}/v1/bases", json={"name": BASE, "fingerprint": FINGERPRINT}
                ).raise_for_status()
                for i in range(args.repeat):
                    # push: executable, in-process, raw boto3 of the same byte count
                    rows["push proc"].append(
                        run_cli("push", str(deltas[2 * i]), f"bench/p{i}", home=work / f"hp{i}", url=url)
                    )
                    clock = PhaseClock()
                    with RegistryApi(url, home=work / f"ha{i}") as api:
                        t0 = time.perf_counter()
                        api.push(deltas[2 * i + 1], f"bench/a{i}", progress=clock)
                        rows["push api"].append(time.perf_counter() - t0)
                    phases.append(clock.durations())
                    t0 = time.perf_counter()
                    s3.upload_file(str(work / "peer.zst"), "bench", f"raw/{uuid.uuid4().hex}")
                    rows["push raw"].append(time.perf_counter() - t0)

                    # pull into fresh caches, then the cache hit, then raw boto3 of the stored object
                    rows["pull proc"].append(
                        run_cli("pull", f"bench/p{i}", home=work / f"fresh-p{i}", url=url)
                    )
                    rows["hit proc"].append(
                        run_cli("pull", f"bench/p{i}", home=work / f"fresh-p{i}", url=url)
                    )
                    with RegistryApi(url, home=work / f"fresh-a{i}") as api:
                        t0 = time.perf_counter()
                        pulled = api.pull(f"bench/a{i}")
                        rows["pull api"].append(time.perf_counter() - t0)
                        assert not pulled.cache_hit
                        t0 = time.perf_counter()
                        assert api.pull(f"bench/a{i}").cache_hit
                        rows["hit api"].append(time.perf_counter() - t0)
                    key = next(
                        o["Key"]
                        for o in s3.list_objects_v2(Bucket="bench", Prefix="registry/blobs/")["Contents"]
                        if pulled.version.digest.removeprefix("sha256:") in o["Key"]
                    )
                    t0 = time.perf_counter()
                    s3.download_file("bench", key, str(work / "peer-download"))
                    rows["pull raw"].append(time.perf_counter() - t0)
                    for p in work.glob("fresh-*"):
                        shutil.rmtree(p)  # keep the disk use to one round's worth
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in rows.items()}
    mb = stored.size / 1e6
    print(
        f"\ndeltactl push/pull of a {args.size_mb} MB delta ({mb:.1f} "
        "MB stored) via the registry to moto S3 on loopback, "
        f"median of {args.repeat} interleaved rounds; `deltactl --version` start-up {startup:.2f} s"
    )
    print(
        f"{'op':<16} {'deltactl s':>11} {'in-process s':>13} {'MB/s':>7} {'raw boto3 s':>12} {'MB/s':>7} "
        f"{'ratio':>6} {'ratio (exe)':>12}  goal"
    )
    for op, label in (("push", "push"), ("pull", "pull")):
        proc, api, raw = med[f"{op} proc"], med[f"{op} api"], med[f"{op} raw"]
        print(
            f"{label:<16} {proc:>11.2f} {api:>13.2f} {mb / api:>7.1f} {raw:>12.2f} {mb / raw:>7.1f} "
            f"{raw / api:>6.2f} {raw / proc:>12.2f}  >= 0.90"
        )
    print(f"{'pull (cache hit)':<16} {med['hit proc']:>11.2f} {med['hit api'] * 1000:>11.1f}ms")
    print(
        "\npush phases (in-process, median s): "
        + ", ".join(f"{name} {statistics.median(p.get(name, 0.0) for p in phases):.2f}" for name in phases[0])
    )
    print(
        "ratio = raw boto3 time / our in-process time; ratio (exe) uses the deltactl executable's wall time."
    )


if __name__ == "__main__":
    main()
