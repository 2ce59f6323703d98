"""Client benchmark (not a test): `deltactl push` and `pull` of a 200 MB and a 2 GB delta through
the registry to two independently written S3 servers on loopback (moto's server, npm's s3rver)
beside raw boto3 transfers of the same bytes to the same endpoint, interleaved in one run; the
cache-hit pull; and the client's peak memory at both sizes (it should not grow with the file).

Each time is measured twice: `deltactl` (a new process running the console script's entry point:
interpreter and imports included; its peak RSS is its VmHWM at exit) and the same command's work
in-process (`RegistryApi.push` / `.pull`, what the command runs after start-up; its peak Python
heap comes from tracemalloc in a separate, untimed push and pull). Push = validate + zstd +
sha256 of both forms + upload + the registry's verification; pull = download + sha256 +
decompress + sha256 into the cache.

    python bench/client_bench.py                        # s3rver 200 MB + 2 GB, moto 200 MB; 3 rounds
    python bench/client_bench.py --quick                # 200 MB only, 1 round
    python bench/client_bench.py --code /work/wt/other  # measure another checkout's client and server
    python bench/client_bench.py --servers moto --sizes-mb 50 --repeat 5 --json out.json
    python bench/client_bench.py --servers s3rver --sizes-mb 200 --repeat 3 --ops pull  # pulls only

Synthetic deltas are streamed to disk (never built in memory); each push sends distinct bytes (one
float of the delta changed) into a fresh DELTACTL_HOME, so nothing deduplicates. Both servers take
the registry's multipart push (part objects the registry reads and assembles as they arrive).
The pull is compared with boto3's `download_file` twice: its default (8 MiB ranged GETs, 10 threads;
not run on moto above 512 MB, where every ranged GET copies the whole object in moto's memory) and
one GET, our pull's request pattern. moto holds whole objects in memory (multipart assembly, every
GET): it is skipped above --moto-max-mb (512), since at 1 GB the OOM killer ended it on a 24 GiB
machine shared with others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

# this checkout's test support (and its S3 credentials, which both servers accept)
from tests.support.live_registry import s3rver_s3  # noqa: E402

SINGLE_PUT_MAX = 5 << 30  # S3's largest single PUT
GOALS = {"push": 0.9, "pull": 1.0}
MOTO_RANGED_MAX_MB = 512


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


# `deltactl` as its console script runs it, reporting the process's own peak RSS (VmHWM) at exit.
# wait4's ru_maxrss would not do: a vfork'ed child inherits the parent's (this benchmark's) peak.
DELTACTL_PEAK = """
import atexit, os, sys
def report():
    with open("/proc/self/status") as status, open(os.environ["DS_BENCH_PEAK_FILE"], "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
atexit.register(report)
from cli.main import main
sys.argv[0] = "deltactl"
sys.exit(main())
"""


def run_cli(code: Path, *args: str, home: Path, url: str) -> tuple[float, int]:
    """Run `deltactl` on `code`'s modules: (wall seconds, peak RSS bytes of the process)."""
    with tempfile.NamedTemporaryFile() as peak, tempfile.TemporaryFile() as err:
        env = {
            **os.environ,
            "DELTACTL_HOME": str(home),
            "DELTACTL_REGISTRY": url,
            "PYTHONPATH": str(code),
            "DS_BENCH_PEAK_FILE": peak.name,
        }
        t0 = time.perf_counter()
        # cwd too: `python -c` puts the working directory ahead of PYTHONPATH
        proc = subprocess.run(
            [sys.executable, "-c", DELTACTL_PEAK, *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=code,
        )
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"deltactl {' '.join(args)} failed: {err.read().decode()[-2000:]}")
        return elapsed, int(Path(peak.name).read_text()) * 1024  # kB


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (the S3 server and the registry run in
    their own processes, so an in-process call's CPU is the client's alone)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def vary(path: Path, n: int) -> None:
    """Make the delta at `path` distinct from every earlier variant: its first stored float (the
    scale, right after the safetensors header) becomes a function of `n`."""
    with open(path, "r+b") as fh:
        header_len = struct.unpack("<Q", fh.read(8))[0]
        fh.seek(8 + header_len)
        fh.write(struct.pack("<f", 0.01 + n * 1e-6))


@contextlib.contextmanager
def registry_process(env: dict[str, str], code: Path, log: Path) -> Iterator[str]:
    """The registry of `code` under uvicorn in its own process (output to `log`); yields its URL."""
    from registry_bench import free_port

    from registry.server.db import create_db_engine
    from registry.server.migrate import upgrade
    from registry.server.settings import Settings

    engine = create_db_engine(
        Settings(**{k.removeprefix("DELTASTORE_").lower(): v for k, v in env.items()}).resolved_database_url
    )
    upgrade(engine)
    engine.dispose()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "uvicorn", "--factory", "registry.server.app:create_app"]
    args += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"]
    with open(log, "ab") as out:
        # cwd too: `python -m` puts the working directory ahead of PYTHONPATH
        proc = subprocess.Popen(
            args, env={**os.environ, **env, "PYTHONPATH": str(code)}, stdout=out, stderr=out, cwd=code
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the registry did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def s3_client(endpoint: str):
    """boto3 as the registry's S3 blob store configures it (checksums only where required, which
    s3rver needs and which keeps the peer's CPU work to the transfer itself)."""
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)


def new_case(server: str, endpoint: str, size_mb: int, work: Path) -> tuple:
    """A fresh bucket on `endpoint`, a case directory under `work`, the registry's environment for
    them, and a synthetic delta of `size_mb`: (s3 client, bucket, directory, env, delta path)."""
    from registry_bench import make_delta

    s3 = s3_client(endpoint)
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    case = work / f"{server}-{size_mb}"
    case.mkdir()
    env = {
        "DELTASTORE_DATA_DIR": str(case / "data"),
        "DELTASTORE_BLOB_URL": f"s3://{bucket}/registry",
        "DELTASTORE_S3_ENDPOINT_URL": endpoint,
    }
    return s3, bucket, case, env, make_delta(case / "delta.bdelta", size_mb, seed=size_mb)


def bench_case(
    server: str, endpoint: str, size_mb: int, repeat: int, code: Path, work: Path, ops: frozenset[str]
) -> dict:
    """`repeat` interleaved rounds of ours vs raw boto3 on one server at one size, then one
    untimed tracemalloc push and pull. Returns the raw figures. With `ops` = {"pull"} each round's
    version is pushed untimed (in-process, with the registry's default multipart threshold, so
    the push's memory stays bounded at any size) and only the pulls are measured."""
    from boto3.s3.transfer import TransferConfig
    from registry_bench import BASE, FINGERPRINT

    from codec.storage import compress_blob
    from registry.client.api import RegistryApi

    s3, bucket, case, env, delta = new_case(server, endpoint, size_mb, work)
    peer = case / "peer.zst"
    stored = compress_blob(delta, peer)  # the peer moves the same (stored) bytes
    transfer = TransferConfig()  # boto3's defaults: 8 MiB parts, 10 threads
    one_get = TransferConfig(multipart_threshold=SINGLE_PUT_MAX)  # the request pattern of our pull
    # moto copies the whole object out of its store for every GET, ranged or not: boto3's 8 MiB
    # ranged download of 2 GB would copy 256 x 2 GB (and up to 10 x 2 GB at once in memory)
    ranged_peer = not (server == "moto" and size_mb > MOTO_RANGED_MAX_MB)
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "push proc",
            "push api",
            "push raw",
            "pull proc",
            "pull api",
            "pull raw",
            "pull raw 1GET",
            "hit proc",
            "hit api",
            "pull api cpu",
            "pull raw 1GET cpu",
        )
    }
    rss: dict[str, list[int]] = {"push": [], "pull": []}
    phases: list[dict[str, float]] = []
    variant = 0

    def next_variant() -> None:
        nonlocal variant
        variant += 1
        vary(delta, variant)

    def blob_key(url: str, repo: str) -> str:
        """The S3 key of a version's blob, from the presigned URL its download redirects to
        (path-style: /<bucket>/<key>), whatever key layout the registry uses."""
        r = httpx.get(f"{url}/v1/repos/{repo}/versions/latest/download", follow_redirects=False)
        assert r.status_code == 307, r.text
        return urllib.parse.unquote(urllib.parse.urlsplit(r.headers["location"]).path).removeprefix(
            f"/{bucket}/"
        )

    with registry_process(env, code, work / f"registry-{server}-{size_mb}.log") as url:
        httpx.post(f"{url}/v1/bases", json={"name": BASE, "fingerprint": FINGERPRINT}).raise_for_status()
        for i in range(repeat):
            homes = [case / f"hp{i}", case / f"ha{i}", case / f"fresh-p{i}", case / f"fresh-a{i}"]
            if "push" in ops:
                next_variant()
                t, peak = run_cli(code, "push", str(delta), f"bench/p{i}", home=homes[0], url=url)
                rows["push proc"].append(t)
                rss["push"].append(peak)
                next_variant()
                clock = PhaseClock()
                with RegistryApi(url, home=homes[1]) as api:
                    t0 = time.perf_counter()
                    api.push(delta, f"bench/a{i}", progress=clock)
                    rows["push api"].append(time.perf_counter() - t0)
                phases.append(clock.durations())
                raw_key = f"raw/{uuid.uuid4().hex}"
                t0 = time.perf_counter()
                s3.upload_file(str(peer), bucket, raw_key, Config=transfer)
                rows["push raw"].append(time.perf_counter() - t0)
                s3.delete_object(Bucket=bucket, Key=raw_key)
            else:  # one version, pulled by both the command and the in-process call (fresh caches)
                next_variant()
                with RegistryApi(url, home=homes[1]) as api:
                    api.push(delta, f"bench/a{i}")
            cli_repo = f"bench/p{i}" if "push" in ops else f"bench/a{i}"

            t, peak = run_cli(code, "pull", cli_repo, home=homes[2], url=url)
            rows["pull proc"].append(t)
            rss["pull"].append(peak)
            rows["hit proc"].append(run_cli(code, "pull", cli_repo, home=homes[2], url=url)[0])
            with RegistryApi(url, home=homes[3]) as api:
                c0, t0 = cpu_seconds(), time.perf_counter()
                pulled = api.pull(f"bench/a{i}")
                rows["pull api"].append(time.perf_counter() - t0)
                rows["pull api cpu"].append(cpu_seconds() - c0)
                assert not pulled.cache_hit
                t0 = time.perf_counter()
                assert api.pull(f"bench/a{i}").cache_hit
                rows["hit api"].append(time.perf_counter() - t0)
            key = blob_key(url, f"bench/a{i}")
            if ranged_peer:
                t0 = time.perf_counter()
                s3.download_file(bucket, key, str(case / "peer-download"), Config=transfer)
                rows["pull raw"].append(time.perf_counter() - t0)
                (case / "peer-download").unlink()
            c0, t0 = cpu_seconds(), time.perf_counter()
            s3.download_file(bucket, key, str(case / "peer-download"), Config=one_get)
            rows["pull raw 1GET"].append(time.perf_counter() - t0)
            rows["pull raw 1GET cpu"].append(cpu_seconds() - c0)
            (case / "peer-download").unlink()
            for home in homes:
                shutil.rmtree(home, ignore_errors=True)  # keep the disk use to one round's worth
            for repo in {cli_repo, f"bench/a{i}"}:
                s3.delete_object(Bucket=bucket, Key=blob_key(url, repo))

        # peak Python heap of one push and one pull, untimed (tracemalloc slows allocation)
        next_variant()
        push_heap = 0
        with RegistryApi(url, home=case / "hm") as api:
            if "push" in ops:
                tracemalloc.start()
            api.push(delta, "bench/mem")
            if "push" in ops:
                push_heap = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
        with RegistryApi(url, home=case / "hm-pull") as api:
            tracemalloc.start()
            api.pull("bench/mem")
            pull_heap = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    shutil.rmtree(case, ignore_errors=True)
    return {
        "server": server,
        "size_mb": size_mb,
        "stored_mb": stored.size / 1e6,
        "repeat": repeat,
        "registry_upload": "presigned parts",
        "ops": sorted(ops),
        "times": rows,
        "rss": rss,
        "heap": {"push": push_heap, "pull": pull_heap},
        "phases": {name: statistics.median(p.get(name, 0.0) for p in phases) for name in phases[0]}
        if phases
        else {},
    }


@contextlib.contextmanager
def s3_server(name: str) -> Iterator[str]:
    if name == "moto":
        from registry_bench import free_port, process

        port = free_port()
        env = {
            "S3_UPLOAD_PART_MIN_SIZE": str(5 << 20),  # S3's, not the 1 KiB the tests give moto
            # objects past 16 MiB spool to disk (a buffer size of 0, what the tests' part size
            # implies, keeps every object in moto's memory: 2 GB deltas would not fit)
            "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(16 << 20),
        }
        args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        # its own process, so it does not share the client's GIL
        with process(args, env=env, ready_url=f"http://127.0.0.1:{port}/moto-api/"):
            yield f"http://127.0.0.1:{port}"
    else:
        with s3rver_s3() as endpoint:
            yield endpoint


def machine_state(code: Path) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    rev = subprocess.run(
        ["git", "-C", str(code), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    ).stdout.strip()
    return f"{platform.node()}: {os.cpu_count()} cores, load average {load}; code {code} at {rev[:70]}"


def print_results(cases: list[dict], startup: float) -> None:
    print(f"\n`deltactl --version` start-up {startup:.2f} s")
    print(
        "\n| server | size | op | `deltactl` s | in-process s (MB/s) | raw boto3 s (MB/s) "
        "| ratio raw / in-process | ratio raw / `deltactl` | goal |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for c in cases:
        med = {k: statistics.median(v) for k, v in c["times"].items() if v}
        mb = c["stored_mb"]
        peers = [("push", "push raw", "boto3 upload_file"), ("pull", "pull raw", "boto3 download_file")]
        peers.append(("pull", "pull raw 1GET", "boto3 one GET"))
        for op, peer, how in peers:
            if op not in c.get("ops", ("push", "pull")):
                continue
            if peer not in med:
                print(f"| {c['server']} | {c['size_mb']} MB | {op} vs {how} | not run (see notes) |")
                continue
            proc, api, raw = med[f"{op} proc"], med[f"{op} api"], med[peer]
            print(
                f"| {c['server']} | {c['size_mb']} MB | {op} vs {how} | {proc:.2f} | "
                f"{api:.2f} ({mb / api:.0f}) | {raw:.2f} ({mb / raw:.0f}) | "
                f"{raw / api:.2f} | {raw / proc:.2f} | >= {GOALS[op]:.2f} |"
            )
        print(
            f"| {c['server']} | {c['size_mb']} MB | pull, cache hit | {med['hit proc']:.2f} | "
            f"{med['hit api'] * 1000:.1f} ms | - | - | - | - |"
        )
        if "pull api cpu" in med:
            print(
                f"| {c['server']} | {c['size_mb']} MB | pull CPU s (client process) vs one GET's | - | "
                f"{med['pull api cpu']:.2f} | {med['pull raw 1GET cpu']:.2f} | "
                f"{med['pull raw 1GET cpu'] / med['pull api cpu']:.2f} | - | - |"
            )
    if any(c["phases"] for c in cases):
        print("\nPush phases, in-process (median s):")
    for c in cases:
        if not c["phases"]:
            continue
        print(
            f"- {c['server']} {c['size_mb']} MB ({c['registry_upload']}): "
            + ", ".join(f"{name} {t:.2f}" for name, t in c["phases"].items())
        )
    print(
        "\n| server | size | `deltactl push` peak RSS MB | `deltactl pull` peak RSS MB "
        "| in-process push peak heap MB | in-process pull peak heap MB |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for c in cases:
        pushed = bool(c["rss"]["push"])
        push_rss = f"{max(c['rss']['push']) / 1e6:.0f}" if pushed else "-"
        push_heap = f"{c['heap']['push'] / 1e6:.1f}" if pushed else "-"
        print(
            f"| {c['server']} | {c['size_mb']} MB | {push_rss} | "
            f"{max(c['rss']['pull']) / 1e6:.0f} | {push_heap} | "
            f"{c['heap']['pull'] / 1e6:.1f} |"
        )
    by_server: dict[str, list[dict]] = {}
    for c in cases:
        by_server.setdefault(c["server"], []).append(c)
    for server, cs in by_server.items():
        if len(cs) < 2:
            continue
        small, large = min(cs, key=lambda c: c["size_mb"]), max(cs, key=lambda c: c["size_mb"])
        ratios = [
            f"{what} {large_v / small_v:.2f}"
            for what, small_v, large_v in (
                ("push RSS", max(small["rss"]["push"] or [0]), max(large["rss"]["push"] or [0])),
                ("pull RSS", max(small["rss"]["pull"]), max(large["rss"]["pull"])),
                ("push heap", small["heap"]["push"], large["heap"]["push"]),
                ("pull heap", small["heap"]["pull"], large["heap"]["pull"]),
            )
            if small_v
        ]
        print(
            f"- {server}: peak memory at {large['size_mb']} MB / at {small['size_mb']} MB: "
            + ", ".join(ratios)
            + " (goal: 1.0, independent of the size)"
        )
    print("ratio = raw boto3 time / ours; goal push >= 0.90, pull >= 1.00 of raw boto3 (in-process).")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default="moto,s3rver", help="comma-separated: moto, s3rver")
    parser.add_argument("--sizes-mb", default="200,2048", help="comma-separated delta sizes in MiB")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per server and size")
    parser.add_argument("--quick", action="store_true", help="200 MB only, 1 round")
    parser.add_argument(
        "--code",
        type=Path,
        default=Path(os.environ["PYTHONPATH"].split(os.pathsep)[0]) if os.environ.get("PYTHONPATH") else ROOT,
        help="the checkout whose client, CLI and registry are measured (default: $PYTHONPATH's first "
        "entry, else this one)",
    )
    parser.add_argument(
        "--moto-max-mb", type=int, default=MOTO_RANGED_MAX_MB, help="largest size run on moto (memory)"
    )
    parser.add_argument(
        "--ops",
        default="push,pull",
        help="comma-separated: push, pull (pull alone: each round's version is pushed untimed)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    sizes = [200] if args.quick else [int(s) for s in args.sizes_mb.split(",")]
    repeat = 1 if args.quick else args.repeat
    ops = frozenset(args.ops.split(","))
    if not ops or not ops <= {"push", "pull"}:
        raise SystemExit(f"--ops takes push, pull or both, not {args.ops!r}")
    code = args.code.resolve()
    sys.path.insert(0, str(code))  # the measured client (and the server's migrations) come from there

    import registry.client.api

    if not Path(registry.client.api.__file__).is_relative_to(code):
        raise SystemExit(f"registry.client was imported from {registry.client.api.__file__}, not {code}")

    print(machine_state(code))
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", DELTACTL_PEAK, "--version"],
        capture_output=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(code), "DS_BENCH_PEAK_FILE": os.devnull},
        cwd=code,
    )
    startup = time.perf_counter() - t0
    cases = []
    work = Path(tempfile.mkdtemp(prefix="ds-client-bench-"))
    try:
        for server in args.servers.split(","):
            run_sizes = [size for size in sizes if server != "moto" or size <= args.moto_max_mb]
            if run_sizes != sizes:
                print(f"moto: skipping {sorted(set(sizes) - set(run_sizes))} MB (above --moto-max-mb)")
            if not run_sizes:
                continue
            with s3_server(server) as endpoint:
                for size in run_sizes:
                    t0 = time.perf_counter()
                    cases.append(bench_case(server, endpoint, size, repeat, code, work, ops))
                    if args.json:  # after every case, so a run cut short keeps what it measured
                        record = {"machine": machine_state(code), "startup": startup, "cases": cases}
                        args.json.write_text(json.dumps(record, indent=1))
                    print(
                        f"{server} {size} MB: {repeat} round(s) in {time.perf_counter() - t0:.0f} s; "
                        f"{machine_state(code).split('; ')[0]}",
                        flush=True,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_results(cases, startup)
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine_state(code), "startup": startup, "cases": cases}, indent=1)
        )


if __name__ == "__main__":
    main()
