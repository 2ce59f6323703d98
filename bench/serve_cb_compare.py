"""Why the serving engine is its own small scheduler: transformers' continuous batching
(`model.generate_batch`, paged attention) against `gpu_loader.serving.Engine` on the same prompts
and model, greedy, in one run (tiny random Llama on CPU, as in docs/serving.md).

    python bench/serve_cb_compare.py [--prompts 3] [--new-tokens 8] [--reps 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_loader import DeltaModel  # noqa: E402
from gpu_loader.serving.engine import Engine, EngineConfig, EngineRequest, SamplingParams, TokenEvent  # noqa: E402
from tests.support.model_pairs import make_llama_pair  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, GenerationConfig

    root = Path(tempfile.mkdtemp(prefix="cb-compare-"))
    base, _ = make_llama_pair(root)
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, 384, (int(n),), generator=gen).tolist()
        for n in torch.randint(4, 24, (args.prompts,))
    ]

    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    hf.set_attn_implementation("paged|sdpa")
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)
    hf_times, hf_out = [], None
    for _ in range(args.reps):
        t0 = time.perf_counter()
        out = hf.generate_batch(inputs=prompts, generation_config=config)
        hf_times.append(time.perf_counter() - t0)
        hf_out = [list(out[k].generated_tokens) for k in sorted(out, key=lambda k: int(k.split("_")[-1]))]

    dm = DeltaModel.from_pretrained(base, device="cpu", max_slots=2, memory_budget="16MiB")
    engine = Engine(dm, EngineConfig(max_batch_size=max(8, args.prompts)))
    engine.start()
    ours_times, ours_out = [], None
    for _ in range(args.reps):
        results = [[] for _ in prompts]
        left = threading.Semaphore(0)

        def sink_for(i, results=results, left=left):
            def sink(ev):
                if isinstance(ev, TokenEvent):
                    results[i].append(ev.token_id)
                else:
                    left.release()

            return sink

        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.submit(
                EngineRequest(f"r{i}", "base", tuple(p), SamplingParams(args.new_tokens, temperature=0)),
                sink_for(i),
            )
        for _ in prompts:
            left.acquire()
        ours_times.append(time.perf_counter() - t0)
        ours_out = results
    engine.stop()
    same = hf_out == ours_out
    print(
        f"{args.prompts} prompts x {args.new_tokens} new tokens, tiny Llama (hidden 64, 2 layers), CPU, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"| scheduler | seconds (best of {args.reps}) | tokens/s |\n|---|---|---|")
    total = args.prompts * args.new_tokens
    for name, ts in (
        ("transformers generate_batch (paged|sdpa)", hf_times),
        ("gpu_loader.serving.Engine", ours_times),
    ):
        print(f"| {name} | {min(ts):.3f} | {total / min(ts):.1f} |")
    print(f"same greedy tokens: {same}")


if __name__ == "__main__":
    main()
