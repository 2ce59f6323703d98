"""The long fuzzing campaign of the `.bdelta` reader and of the zstd storage form (not a test).

Coverage-guided with atheris (libFuzzer) when it is installed: the codec and the registry's upload
verification are instrumented, inputs start from valid deltas (tests/reliability/corpus.py) and
are mutated half by libFuzzer's byte-level mutators, half by the structure-aware mutators of
tests/reliability/delta_fuzz.py (truncations, flipped bytes, forged offsets, shapes, dtypes, header
lengths, metadata). Every input goes through the oracle of delta_fuzz.py; a violation (a crash
other than the codec's own errors, an accepted file that does not round-trip, a disagreement
between readers) or an input slower than --timeout stops the run with the input saved.
Without atheris the same mutators run as a seeded loop.

    nice -n 10 python bench/reliability_fuzz.py --runs 20000            # both targets
    python bench/reliability_fuzz.py --target file --runs 100000 --max-time 1800
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# --- the fuzzing process (run by atheris in a child process) ---------------------------------
def _child(target: str, stats_path: Path, corpus: Path, libfuzzer_args: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["codec", "registry"]):
        import codec.container  # noqa: F401
        import codec.format  # noqa: F401
        import codec.storage  # noqa: F401
        import registry.server.verify  # noqa: F401
    from tests.support import delta_fuzz
    from tests.support.corpus import seed_deltas, storage_form

    seeds = seed_deltas()
    raws = list(seeds.values())
    work = Path(tempfile.mkdtemp(prefix="ds-fuzz-"))
    path = work / "case.bdelta"
    counts = {"accepted": 0, "rejected": 0}

    @contextlib.contextmanager
    def no_alarm(seconds):  # libFuzzer's -timeout owns SIGALRM here, and catches hangs itself
        yield

    delta_fuzz.deadline = no_alarm

    def one_file(data: bytes) -> None:
        counts[delta_fuzz.check_delta(data, path)] += 1

    def one_blob(data: bytes) -> None:
        raw = raws[data[0] % len(raws)] if data else raws[0]
        counts[delta_fuzz.check_blob(data[1:], raw)] += 1

    test_one = one_file if target == "file" else one_blob
    n = [0]

    def test_one_input(data: bytes) -> None:
        test_one(data)
        n[0] += 1
        if n[0] % 250 == 0:
            stats_path.write_text(json.dumps({"cases": n[0], **counts}))

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            out = atheris.Mutate(data, max_size)
        elif target == "file":
            out = delta_fuzz.mutate(rng, data if len(data) >= 8 else rng.choice(raws), seeds)
        else:
            raw_index = rng.randrange(len(raws))
            out = bytes([raw_index]) + delta_fuzz.mutate_blob(rng, storage_form(raws[raw_index]).data)
        return out[:max_size]

    for i, raw in enumerate(raws):
        (corpus / f"seed{i}").write_bytes(raw if target == "file" else bytes([i]) + storage_form(raw).data)
    atheris.Setup([sys.argv[0], *libfuzzer_args, str(corpus)], test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


def run_atheris(target: str, runs: int, max_time: int, timeout: int, out: Path) -> dict:
    stats = out / f"{target}-stats.json"
    corpus = out / f"{target}-corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    args = [
        f"-runs={runs}",
        f"-max_total_time={max_time}",
        f"-timeout={timeout}",
        "-max_len=8388608",
        "-rss_limit_mb=6144",
        f"-artifact_prefix={out}/{target}-",
        "-print_final_stats=1",
        "-seed=20261125",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            target,
            "--stats",
            str(stats),
            "--corpus",
            str(corpus),
            "--",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    seconds = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    (out / f"{target}-libfuzzer.log").write_text(log)
    done = re.findall(r"Done (\d+) runs in (\d+) second", log)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", log)
    counts = json.loads(stats.read_text()) if stats.exists() else {}
    crashed = proc.returncode != 0
    return {
        "target": target,
        "engine": "atheris (libFuzzer, coverage-guided)",
        "cases": int(done[-1][0]) if done else counts.get("cases"),
        "seconds": round(seconds, 1),
        "accepted": counts.get("accepted"),
        "rejected": counts.get("rejected"),
        "coverage_edges": int(cov[-1][0]) if cov else None,
        "features": int(cov[-1][1]) if cov else None,
        "crashes": int(crashed and "timeout" not in log.lower()),
        "hangs": int("ERROR: libFuzzer: timeout" in log),
        "round_trip_failures": int("FuzzFailure" in log),
        "exit_code": proc.returncode,
        "artifacts": sorted(p.name for p in out.glob(f"{target}-crash-*"))
        + sorted(p.name for p in out.glob(f"{target}-timeout-*")),
        "tail": log[-1500:] if crashed else "",
    }


def run_seeded(target: str, runs: int, max_time: int, seed: int, out: Path) -> dict:
    from tests.support import delta_fuzz
    from tests.support.corpus import seed_deltas, storage_form

    seeds = seed_deltas()
    raws = list(seeds.values())
    rng = random.Random(seed)
    path = Path(tempfile.mkdtemp(prefix="ds-fuzz-")) / "case.bdelta"
    counts = {"accepted": 0, "rejected": 0}
    failures, hangs = [], 0
    slowest = [0.0, 0, 0]  # seconds, case number, bytes
    t0 = time.perf_counter()
    n = 0
    while n < runs and time.perf_counter() - t0 < max_time:
        n += 1
        raw = rng.choice(raws)
        case = (
            delta_fuzz.mutate(rng, raw, seeds)
            if target == "file"
            else delta_fuzz.mutate_blob(rng, storage_form(raw).data)
        )
        started = time.perf_counter()
        try:
            if target == "file":
                counts[delta_fuzz.check_delta(case, path)] += 1
            else:
                counts[delta_fuzz.check_blob(case, raw)] += 1
        except delta_fuzz.Hang:
            hangs += 1
            (out / f"{target}-hang-{n}").write_bytes(case)
        except delta_fuzz.FuzzFailure as exc:
            failures.append(str(exc)[:300])
            (out / f"{target}-failure-{n}").write_bytes(case)
        took = time.perf_counter() - started
        if took > slowest[0]:
            slowest[:] = [took, n, len(case)]
    return {
        "target": target,
        "engine": "seeded structure-aware mutation",
        "cases": n,
        "seconds": round(time.perf_counter() - t0, 1),
        **counts,
        "coverage_edges": None,
        "crashes": sum("crash" in f for f in failures),
        "hangs": hangs,
        "slowest_case_s": round(slowest[0], 2),
        "slowest_case_bytes": slowest[2],
        "round_trip_failures": sum("crash" not in f for f in failures),
        "first_failures": failures[:5],
    }


def main() -> None:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        target = sys.argv[i + 1]
        stats = Path(sys.argv[sys.argv.index("--stats") + 1])
        corpus = Path(sys.argv[sys.argv.index("--corpus") + 1])
        _child(target, stats, corpus, sys.argv[sys.argv.index("--") + 1 :])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", choices=["file", "blob", "both"], default="both")
    parser.add_argument("--runs", type=int, default=20_000, help="cases per target")
    parser.add_argument("--max-time", type=int, default=1800, help="seconds per target at most")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one case may take (a hang)")
    parser.add_argument("--engine", choices=["auto", "atheris", "seeded"], default="auto")
    parser.add_argument("--seed", type=int, default=20261125)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "deltastore-fuzz")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "seeded"
    targets = ["file", "blob"] if args.target == "both" else [args.target]
    rows = []
    for target in targets:
        row = (
            run_atheris(target, args.runs, args.max_time, args.timeout, args.out)
            if engine == "atheris"
            else run_seeded(target, args.runs, args.max_time, args.seed, args.out)
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nfuzzing campaign ({engine})")
    print(
        f"{'target':<8} {'cases':>8} {'accepted':>9} {'rejected':>9} "
        f"{'cov':>6} {'crashes':>8} {'hangs':>6} {'no round trip':>14} {'s':>7}"
        "   goal: >= 10,000 cases, 0 / 0 / 0"
    )
    for r in rows:
        print(
            f"{r['target']:<8} {r['cases'] or 0:>8} {r.get('accepted') or 0:>9} {r.get('rejected') or 0:>9} "
            f"{r.get('coverage_edges') or '-':>6} {r['crashes']:>8} "
            f"{r['hangs']:>6} {r['round_trip_failures']:>14} {r['seconds']:>7}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if any(r["crashes"] or r["hangs"] or r["round_trip_failures"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
