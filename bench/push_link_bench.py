"""Push over a link of a given speed: how far a push stays from the time the link itself needs.

On loopback the "wire" is as fast as the CPU, and client, S3 server and registry share this
machine's two cores, so bench/client_bench.py measures CPU contention more than protocol. Here the
client's part PUTs are paced to `--link-mbps` (one token bucket over all upload threads, as a
client's uplink is), and each push is timed against the floor the link sets (stored bytes / link
speed): what remains above it is the protocol's own serial work — chiefly the registry's
verification after the last byte (`complete`). Run it on two checkouts to compare them:

    python bench/push_link_bench.py --servers moto,s3rver --size-mb 200 --link-mbps 40
    python bench/push_link_bench.py --code /work/wt/other ...

Every push sends distinct bytes into a fresh DELTACTL_HOME (no dedup).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))


class Link:
    """A token bucket shared by every upload thread: at most `rate` bytes per second leave."""

    def __init__(self, rate: float):
        self.rate, self.lock, self.next_free = rate, threading.Lock(), time.monotonic()

    def pace(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + n / self.rate
        time.sleep(max(0.0, start + n / self.rate - now))


def paced_chunks(link: Link, real):
    def chunks(data, advance, sent):
        for buf in real(data, advance, sent):
            link.pace(len(buf))
            yield buf

    return chunks


def run(
    server: str, endpoint: str, size_mb: int, repeat: int, link_mbps: float, code: Path, work: Path
) -> dict:
    from client_bench import PhaseClock, new_case, registry_process, vary
    from registry_bench import BASE, FINGERPRINT

    from codec.storage import compress_blob
    from registry.client import transfer
    from registry.client.api import RegistryApi

    _, _, case, env, delta = new_case(server, endpoint, size_mb, work)
    stored = compress_blob(delta, case / "stored.zst").size
    floor = stored / (link_mbps * 1e6)
    link = Link(link_mbps * 1e6)
    real = transfer._bytes_chunks
    transfer._bytes_chunks = paced_chunks(link, real)
    totals, after = [], []
    try:
        with registry_process(env, code, work / f"registry-{server}.log") as url:
            import httpx

            httpx.post(f"{url}/v1/bases", json={"name": BASE, "fingerprint": FINGERPRINT}).raise_for_status()
            for i in range(repeat):
                vary(delta, i + 1)
                clock = PhaseClock()
                link.next_free = time.monotonic()
                with RegistryApi(url, home=case / f"h{i}") as api:
                    t0 = time.perf_counter()
                    api.push(delta, f"bench/l{i}", progress=clock)
                    totals.append(time.perf_counter() - t0)
                after.append(clock.durations().get("verifying (registry)", 0.0))
    finally:
        transfer._bytes_chunks = real
    return {
        "server": server,
        "stored_mb": stored / 1e6,
        "floor": floor,
        "push": statistics.median(totals),
        "after": statistics.median(after),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default="moto,s3rver")
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--link-mbps", type=float, default=40.0, help="the client's uplink, MB/s")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose client and registry run")
    args = parser.parse_args()
    code = args.code.resolve()
    sys.path.insert(0, str(code))
    from client_bench import machine_state, s3_server

    print(machine_state(code))
    rows = []
    with tempfile.TemporaryDirectory(prefix="ds-link-bench-") as tmp:
        for server in args.servers.split(","):
            with s3_server(server) as endpoint:
                rows.append(run(server, endpoint, args.size_mb, args.repeat, args.link_mbps, code, Path(tmp)))
    print(machine_state(code))
    print(
        f"\n| server | stored MB | link MB/s | link floor s | push s (median of {args.repeat}) "
        "| push / floor | after the last byte (`complete`) s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [r["server"], f"{r['stored_mb']:.1f}", f"{args.link_mbps:g}", f"{r['floor']:.2f}"]
        cells += [f"{r['push']:.2f}", f"{r['floor'] / r['push']:.2f}", f"{r['after']:.2f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
