"""Where a pull's time goes (not a test): each stage of `deltactl pull`'s download alone and the
whole receive, through httpx and through urllib3, beside boto3's one-GET `download_file` of the
same object from s3rver on loopback, interleaved in one run. Wall seconds and the process's own
CPU seconds (user + system: s3rver's are its own) are the medians of --repeat rounds; on a shared
machine the CPU column moves much less than the wall one.

    python bench/pull_stages.py                       # 200 MiB of random bytes, 5 rounds
    python bench/pull_stages.py --size-mb 50 --repeat 3 --stages boto3,receive-urllib3

The object is the storage form (zstd, level 3, mostly raw blocks) of random bytes, so it is as
incompressible as a real delta; every stage writes fresh files, removed after the round.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from tests.support.live_registry import s3rver_s3  # noqa: E402  (also sets s3rver's credentials)


def cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size-mb", type=int, default=200, help="MiB of random bytes (stored form ~ as large)"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--stages", help="comma-separated subset of the stage names (default: all)")
    args = parser.parse_args()

    from boto3.s3.transfer import TransferConfig
    from client_bench import s3_client

    from codec.files import CHUNK
    from codec.storage import compress_blob, decompress_stream
    from registry.client.http import RegistryHttp
    from registry.client.pull import open_blob_store_download
    from registry.client.transfer import receive_blob

    work = Path(tempfile.mkdtemp(prefix="ds-pull-stages-"))
    try:
        raw = work / "raw"
        with open(raw, "wb") as fh:
            for _ in range(args.size_mb):
                fh.write(os.urandom(1 << 20))
        stored = work / "stored.zst"
        info = compress_blob(raw, stored)
        raw.unlink()
        with s3rver_s3() as endpoint:
            s3 = s3_client(endpoint)
            s3.create_bucket(Bucket="stages")
            s3.upload_file(str(stored), "stages", "blob")
            url = s3.generate_presigned_url(
                "get_object", Params={"Bucket": "stages", "Key": "blob"}, ExpiresIn=3600
            )
            http = RegistryHttp(endpoint, None, upload_concurrency=1, unavailable_max_wait=0)
            out = work / "out"
            out.mkdir()
            counter = [0]

            def fresh(name: str) -> Path:
                counter[0] += 1
                return out / f"{name}-{counter[0]}"

            def urllib3_chunks():
                return open_blob_store_download(http, url, {})

            def boto3_one_get() -> None:
                s3.download_file(
                    "stages", "blob", str(fresh("peer")), Config=TransferConfig(multipart_threshold=5 << 30)
                )

            def recv_httpx() -> None:
                with http.blobs.stream("GET", url) as response:
                    for _ in response.iter_bytes(CHUNK):
                        pass

            def recv_urllib3() -> None:
                with urllib3_chunks() as (chunks, _):
                    for _ in chunks:
                        pass

            def recv_write_urllib3() -> None:
                with urllib3_chunks() as (chunks, _), open(fresh("partial"), "wb") as fh:
                    for buf in chunks:
                        fh.write(buf)

            def sha256_stored() -> None:
                sha = hashlib.sha256()
                with open(stored, "rb") as fh:
                    while buf := fh.read(CHUNK):
                        sha.update(buf)

            def decompress() -> None:
                with open(stored, "rb") as src, open(fresh("raw"), "wb") as dst:
                    decompress_stream(
                        src, dst, max_output_size=info.raw_size, expected_raw_digest=info.raw_digest
                    )

            def receive_httpx() -> None:
                with http.blobs.stream("GET", url) as response:
                    receive_blob(
                        response.iter_bytes(CHUNK),
                        partial=fresh("p"),
                        offset=0,
                        dest=fresh("d"),
                        expected=info,
                    )

            def receive_urllib3() -> None:
                with urllib3_chunks() as (chunks, _):
                    receive_blob(chunks, partial=fresh("p"), offset=0, dest=fresh("d"), expected=info)

            stages: dict[str, tuple[str, Callable[[], None]]] = {
                "boto3": ("boto3 download_file, one GET (the peer)", boto3_one_get),
                "recv-httpx": ("receive only: httpx iter_bytes(1 MiB)", recv_httpx),
                "recv-urllib3": ("receive only: urllib3 read(1 MiB)", recv_urllib3),
                "recv-write": ("receive + write the partial file (urllib3)", recv_write_urllib3),
                "sha256": ("sha256 of the stored file (page cache)", sha256_stored),
                "decompress": ("decompress_stream file -> file (cap, raw sha256)", decompress),
                "receive-httpx": ("receive_blob fed by httpx (before)", receive_httpx),
                "receive-urllib3": ("receive_blob fed by urllib3 (pull now)", receive_urllib3),
            }
            chosen = args.stages.split(",") if args.stages else list(stages)
            unknown = sorted(set(chosen) - set(stages))
            if unknown:
                raise SystemExit(f"unknown stages {unknown}; known: {', '.join(stages)}")
            load0 = os.getloadavg()
            times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in chosen}
            for _ in range(args.repeat):
                for name in chosen:
                    u0, s0 = cpu_seconds()
                    t0 = time.perf_counter()
                    stages[name][1]()
                    wall = time.perf_counter() - t0
                    u1, s1 = cpu_seconds()
                    times[name].append((wall, u1 - u0, s1 - s0))
                    shutil.rmtree(out)
                    out.mkdir()
            http.close()
        load1 = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = info.size / 1e6
    print(f"{os.cpu_count()} cores, load average {load0[0]:.1f} before, {load1[0]:.1f} after")
    print(
        f"object: {mb:.1f} MB stored ({args.size_mb} MiB raw); medians of {args.repeat} interleaved rounds\n"
    )
    peer = statistics.median(w for w, _, _ in times["boto3"]) if "boto3" in times else None
    print("| stage | wall s (MB/s) | user s | sys s | boto3 wall / this |")
    print("| --- | --- | --- | --- | --- |")
    for name in chosen:
        wall = statistics.median(w for w, _, _ in times[name])
        user = statistics.median(u for _, u, _ in times[name])
        sys_ = statistics.median(s for _, _, s in times[name])
        ratio = f"{peer / wall:.2f}" if peer else "-"
        print(f"| {stages[name][0]} | {wall:.2f} ({mb / wall:.0f}) | {user:.2f} | {sys_:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
