"""Routing by delta on Ray Serve: the same replicas behind the multiplexed ingress (the delta ref as
Ray's model id) and behind Ray's default routing (no model id), on the serving benchmark's bursty
multi-tenant trace (bench/serve_bench.py's make_trace: Poisson arrivals with bursts, Zipf tenant
popularity, mixed prompt and output lengths, one seed), replayed in real time over HTTP.

    PYTHONPATH=. .venv/bin/python bench/ray_bench.py --quick              # SmolLM2-135M, 32 deltas
    PYTHONPATH=. .venv/bin/python bench/ray_bench.py --model tiny --quick  # a random tiny Llama

Prints, for each routing: the share of delta requests that reached a replica already holding their
delta (or already loading it for another request there), overall, after the warm-up (the first
quarter of the trace) and among repeats (requests for a delta the trace asked for before: a first
request can only miss), tokens/s, p50/p99 request latency, the delta loads into the replicas'
slot pools, and per decode step the rows, the distinct deltas among them and the time (Ray's
metrics). Deltas are served as local paths (`allow_paths`): the registry pull is
the same one-time cost in both routings and is left out.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve_bench import TraceRequest, make_trace  # noqa: E402  (the serving benchmark's trace)
from gpu_loader.ray_serve import (  # noqa: E402
    DELTA_CACHE_HEADER,
    REPLICA_COUNTERS,
    REPLICA_HEADER,
    ServeArgs,
    build_app,
)
from tests.support.harness import free_port  # noqa: E402
from tests.support.model_pairs import make_llama_pair, save_byte_tokenizer  # noqa: E402


def build_deltas(root: Path, count: int, model: str, log=print) -> tuple[Path, list[Path]]:
    """The base and `count` deltas, cached under `root`. `smollm2`: SmolLM2-135M-Instruct and the
    serving benchmark's fine-tunes (Gaussian noise, std 2% of each tensor's, embeddings binarized;
    seed 1000 + i, so its first 16 tenants); `tiny`: a random Llama (hidden 256, 4 layers)."""
    import torch
    from transformers import AutoModelForCausalLM

    from codec.compress import CompressOptions, compress
    from eval import pair

    base = root / "base"
    deltas = [root / f"tenant{i:02d}.bdelta" for i in range(count)]
    if model == "smollm2":
        pair.build_base(base, dtype="float32", log=log)
        base_name, include = "HuggingFaceTB/SmolLM2-135M-Instruct", ("*embed_tokens*",)
    elif not (base / "tokenizer.json").exists():
        make_llama_pair(root, seed=0, hidden=256, layers=4)
        save_byte_tokenizer(base)
        shutil.rmtree(root / "finetuned")
    if model == "tiny":
        base_name, include = "bench/tiny-llama", ()
    for i, out in enumerate(deltas):
        if out.exists():
            continue
        log(f"delta {i}: base + noise, compressed")
        ft = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(
                    torch.randn(p.shape, generator=gen) * 0.02 * (p.float().std() if p.numel() > 1 else 1.0)
                )
        ft_dir = root / "ft"
        ft.save_pretrained(ft_dir)
        del ft
        compress(base, ft_dir, out, CompressOptions(base_name=base_name, include=include))
        shutil.rmtree(ft_dir)  # a full checkpoint per tenant is not needed here: only its delta
    return base, deltas


@dataclass
class Answer:
    model: str
    replica: str
    cache: str | None
    tokens: int
    seconds: float
    status: int


async def replay(url: str, trace: list[TraceRequest], models: list[str]) -> tuple[list[Answer], float]:
    """Each request sent at its arrival time (real time); `models[tenant]` is its `model`."""
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        start = time.perf_counter()

        async def one(req: TraceRequest) -> Answer:
            await asyncio.sleep(max(0.0, req.arrival - (time.perf_counter() - start)))
            t0 = time.perf_counter()
            model = models[req.tenant]
            body = {"model": model, "prompt": list(req.prompt), "max_tokens": req.output, "temperature": 0}
            r = await client.post("/v1/completions", json=body)
            tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
            return Answer(
                model,
                r.headers.get(REPLICA_HEADER, "?"),
                r.headers.get(DELTA_CACHE_HEADER),
                tokens,
                time.perf_counter() - t0,
                r.status_code,
            )

        answers = await asyncio.gather(*(one(r) for r in trace))
        return list(answers), time.perf_counter() - start


def scrape(url: str, metrics: list[str]) -> dict[str, dict[str, float]]:
    """metric -> replica tag -> value, for some of Ray's metrics, from one scrape."""
    out: dict[str, dict[str, float]] = {m: {} for m in metrics}
    for line in httpx.get(url, timeout=10).text.splitlines():
        metric = line.split("{", 1)[0]
        if metric in out:
            replica = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0])).get("replica", "")
            out[metric][replica] = out[metric].get(replica, 0.0) + float(line.rsplit(" ", 1)[-1])
    return out


def replica_totals(metrics_url: str, replicas: set[str], expected_loads: int) -> dict[str, dict[str, float]]:
    """REPLICA_COUNTERS key -> replica tag -> total; waits until the loads reach `expected_loads`
    and two scrapes agree (Ray's metrics agent reports periodically)."""
    tags = {r.rsplit("#", 1)[-1] for r in replicas}
    names = {key: f"ray_{name}_total" for key, (name, _) in REPLICA_COUNTERS.items()}
    deadline, last = time.monotonic() + 20, None
    while True:
        scraped = scrape(metrics_url, list(names.values()))
        got = {key: {t: scraped[name].get(t, 0.0) for t in tags} for key, name in names.items()}
        settled = got == last and sum(got["loads"].values()) >= expected_loads
        if settled or time.monotonic() > deadline:
            return got
        last = got
        time.sleep(1.0)


def run_routing(
    name: str,
    args: ServeArgs,
    trace: list[TraceRequest],
    models: list[str],
    url: str,
    metrics_url: str,
    warmup: int,
) -> dict:
    from ray import serve

    serve.run(build_app(args), name="bench", route_prefix="/")
    try:
        answers, wall = asyncio.run(replay(url, trace, models))
        misses = sum(a.cache == "miss" for a in answers)
        totals = replica_totals(metrics_url, {a.replica for a in answers}, misses and 1)
    finally:
        serve.delete("bench")
    ok = [a for a in answers if a.status == 200]
    after = [a for a in answers[warmup:] if a.cache is not None]
    seen: set[str] = set()  # repeats: requests for a delta the trace asked for before (in arrival order)
    repeats = []
    for a in answers:
        if a.model in seen and a.cache is not None:
            repeats.append(a)
        seen.add(a.model)
    lat = sorted(a.seconds for a in ok)
    loads = {t: int(v) for t, v in totals["loads"].items()}
    steps = max(1.0, sum(totals["steps"].values()))
    return {
        "routing": name,
        "requests": len(answers),
        "failed": len(answers) - len(ok),
        "hit_all": sum(a.cache == "hit" for a in answers) / max(1, sum(a.cache is not None for a in answers)),
        "hit_after": sum(a.cache == "hit" for a in after) / max(1, len(after)),
        "hit_repeat": sum(a.cache == "hit" for a in repeats) / max(1, len(repeats)),
        "tokens_s": sum(a.tokens for a in ok) / wall,
        "p50": lat[len(lat) // 2] if lat else float("nan"),
        "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan"),
        "loads": sum(loads.values()),
        "per_replica": sorted(loads.values()),
        "rows_step": sum(totals["rows"].values()) / steps,
        "deltas_step": sum(totals["deltas"].values()) / steps,
        "ms_step": 1e3 * sum(totals["seconds"].values()) / steps,
        "wall": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short trace (a few minutes on 2 CPU cores)")
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--deltas", type=int, default=32)
    ap.add_argument("--slots", type=int, default=12, help="slot pool size of each replica")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--rate", type=float, default=None, help="mean arrivals per second")
    ap.add_argument(
        "--max-ongoing", type=int, default=None, help="max_ongoing_requests per replica (default: the app's)"
    )
    ap.add_argument(
        "--max-running-per-tenant",
        type=int,
        default=None,
        help="the engine's per-tenant cap on running sequences, per replica (default: half the batch)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cpus", type=int, default=2, help="CPUs of the local Ray cluster (shared by the replicas)"
    )
    ap.add_argument("--workdir", type=Path, default=None, help="default: /tmp/deltastore-ray-bench-MODEL")
    ap.add_argument("--setup-only", action="store_true", help="build the base and deltas, then stop")
    opts = ap.parse_args()
    n = opts.requests or (96 if opts.quick else 256)
    rate = opts.rate or (1.5 if opts.quick else 2.0)
    prompt_range, output_range = ((16, 64), (8, 24)) if opts.quick else ((16, 256), (16, 96))
    root = opts.workdir or Path(tempfile.gettempdir()) / f"deltastore-ray-bench-{opts.model}"

    t0 = time.perf_counter()
    base, deltas = build_deltas(
        root, opts.deltas, opts.model, log=lambda m: print(f"  [setup] {m}", flush=True)
    )
    print(f"base + {len(deltas)} deltas ready in {root} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if opts.setup_only:
        return
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(base).vocab_size
    trace = make_trace(
        n=n,
        tenants=opts.deltas,
        rate=rate,
        prompt_range=prompt_range,
        output_range=output_range,
        vocab=vocab,
        seed=opts.seed,
    )
    models = [str(d) for d in deltas]
    warmup = len(trace) // 4

    import ray
    from ray import serve

    metrics_port, http_port = free_port(), free_port()
    ray.init(
        num_cpus=opts.cpus,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 500},
    )
    results = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        common = dict(
            base=str(base),
            replicas=opts.replicas,
            device=opts.device,
            max_slots=opts.slots,
            memory_budget="4GiB",
            max_batch_size=16,
            max_batch_tokens=512,
            max_queue=256,
            allow_paths=True,
            schedule="mixed",
            calibrate=False,
            num_cpus_per_replica=opts.cpus / opts.replicas,
            max_ongoing_requests=opts.max_ongoing,
            max_running_per_tenant=opts.max_running_per_tenant,
        )
        url, metrics_url = f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics"
        for name, by_model in (("multiplexed (delta ref)", True), ("Ray default (no model id)", False)):
            args = ServeArgs(**common, route_by_model=by_model)
            results.append(run_routing(name, args, trace, models, url, metrics_url, warmup))
            print(f"{name}: done in {results[-1]['wall']:.0f} s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    print(
        f"\n{opts.replicas} replicas ({opts.cpus} CPUs), {opts.model} on {opts.device}, {opts.deltas} deltas "
        f"(Zipf 1.1), {opts.slots} slots per replica; {len(trace)} requests over {trace[-1].arrival:.0f} s "
        f"(rate {rate}/s, bursts), prompts {prompt_range}, outputs {output_range}; warm-up = first {warmup}"
    )
    head = (
        "routing",
        "held (all)",
        "held (warm)",
        "held (rep.)",
        "tokens/s",
        "p50 s",
        "p99 s",
        "loads",
        "per replica",
        "rows/step",
        "deltas/step",
        "ms/step",
        "failed",
    )
    print(f"{head[0]:28} " + " ".join(f"{h:>11}" for h in head[1:]))
    for r in results:
        cells = (
            f"{r['hit_all']:.1%}",
            f"{r['hit_after']:.1%}",
            f"{r['hit_repeat']:.1%}",
            f"{r['tokens_s']:.1f}",
            f"{r['p50']:.2f}",
            f"{r['p99']:.2f}",
            str(r["loads"]),
            str(r["per_replica"]),
            f"{r['rows_step']:.2f}",
            f"{r['deltas_step']:.2f}",
            f"{r['ms_step']:.1f}",
            str(r["failed"]),
        )
        print(f"{r['routing']:28} " + " ".join(f"{c:>11}" for c in cells))
    mux, rr = results
    print(
        f"\nmultiplexed / default: tokens/s x{mux['tokens_s'] / rr['tokens_s']:.2f}, "
        f"delta loads {mux['loads']} vs {rr['loads']} (goal: held after warm-up >= 90%)"
    )


if __name__ == "__main__":
    main()
