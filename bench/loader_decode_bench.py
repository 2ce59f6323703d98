"""CPU decode step of a multi-tenant batch on SmolLM2-135M shapes: the base alone against the same
batch spread over distinct BitDelta deltas, through DeltaModel, timed in one run.

    .venv/bin/python bench/loader_decode_bench.py [--rows 8] [--deltas 3 8] [--threads 2] [--base DIR]

Weights are random with SmolLM2-135M's exact shapes (or a local HF directory with --base, e.g. the
demo's base); every linear of the 30 blocks carries a 1-plane sign delta (embeddings unchanged).
Setups are timed round-robin and the median step is kept, so load from other processes hits all
alike. `DELTASTORE_CPU_KERNEL=0` measures the torch-ops table path instead of the compiled kernel.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_loader import DeltaModel  # noqa: E402
from gpu_loader.sign_cpu import cpu_kernel, cpu_kernel_error  # noqa: E402

#: SmolLM2-135M(-Instruct)'s architecture (HuggingFaceTB/SmolLM2-135M config.json).
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    hidden_act="silu",
)


def build_model(base: str | None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if base:
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()


def random_sign_delta(dm: DeltaModel, key: str, seed: int, per_row: bool) -> int:
    """Install a delta with a random sign plane on every block linear (not the tied embedding)."""
    gen = torch.Generator().manual_seed(seed)
    sign, scale = {}, {}
    for name, (out, inn) in dm.pool.layout.sign.items():
        if "embed_tokens" in name:
            continue
        nb = (inn + 7) // 8
        s = torch.randint(0, 256, (1, out, nb), dtype=torch.uint8, generator=gen)
        if inn % 8:
            s[..., -1] &= (1 << (inn % 8)) - 1  # padding bits are 0, as the format says
        sign[name] = s
        scale[name] = torch.rand(1, out if per_row else 1, generator=gen) * 1e-3
    return dm.pool.install(dm.pool.stage_tensors(key, sign=sign, scale=scale, info={"planes": 1}))


class Decoder:
    """Prefills once, then one KV-cached decode step (one token per row) per call."""

    def __init__(self, dm: DeltaModel, prompt: torch.Tensor, step: torch.Tensor, delta_ids):
        self.dm, self.step_ids, self.delta_ids = dm, step, delta_ids
        self.out = dm.forward(prompt, delta_ids=delta_ids, use_cache=True)

    def __call__(self):
        self.out = self.dm.forward(
            self.step_ids, delta_ids=self.delta_ids, cache=self.out.past_key_values, use_cache=True
        )


def median_steps(setups: dict, steps: int) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds per step of each setup, timed round-robin. CPU time is what
    the step itself consumed, so it survives other processes on a shared machine better than wall
    time (with one torch thread; with more, OpenMP's spin-waits count too)."""
    for fn in setups.values():  # warm-up (and the kernel's first call)
        fn()
    wall = {k: [] for k in setups}
    cpu = {k: [] for k in setups}
    for _ in range(steps):
        for k, fn in setups.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in setups}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--deltas", type=int, nargs="+", default=[3, 8], help="distinct deltas over the rows")
    ap.add_argument("--prompt", type=int, default=16, help="prefill tokens per row before the timed steps")
    ap.add_argument("--steps", type=int, default=12, help="timed decode steps per setup")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-row", action="store_true", help="per-row scales (default: per-matrix)")
    ap.add_argument("--base", help="a local HF model directory instead of random SmolLM2-135M weights")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model(args.base)
    dm = DeltaModel.from_pretrained(
        model,
        device="cpu",
        max_slots=max(args.deltas),
        memory_budget="4GiB",
        backend="torch",
        base_fingerprint="sha256:" + "0" * 64,
    )
    slots = [
        random_sign_delta(dm, f"delta-{i}", seed=i, per_row=args.per_row) for i in range(max(args.deltas))
    ]
    kernel = cpu_kernel()
    gen = torch.Generator().manual_seed(0)
    vocab = dm.model.config.vocab_size
    prompt = torch.randint(0, vocab, (args.rows, args.prompt), generator=gen)
    step = torch.randint(0, vocab, (args.rows, 1), generator=gen)

    setups = {"base": Decoder(dm, prompt, step, None)}
    for n in args.deltas:
        setups[f"{n} deltas"] = Decoder(dm, prompt, step, [slots[r % n] for r in range(args.rows)])
    load_before = os.getloadavg()[0]
    med = median_steps(setups, args.steps)
    load_after = os.getloadavg()[0]

    cfg = dm.model.config
    block_params = sum(o * i for n, (o, i) in dm.pool.layout.sign.items() if "embed_tokens" not in n)
    isa = torch.backends.cpu.get_cpu_capability()
    path = (
        f"compiled kernel ({'AVX-512 register tables' if isa.startswith('AVX512') else 'byte tables'})"
        if kernel is not None
        else f"torch-ops table path ({cpu_kernel_error()})"
    )
    print(
        f"\nSmolLM2-135M shapes ({'weights from ' + args.base if args.base else 'random weights'}, fp32, "
        f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}), decode: {args.rows} rows x 1 token, "
        f"KV cache of {args.prompt}+ tokens, torch threads={torch.get_num_threads()}, delta path: {path}; "
        f"1-plane deltas on every block linear ({block_params / 1e6:.0f}M weights, "
        f"{block_params / 8 / 2**20:.1f} MiB of bits each), {'per-row' if args.per_row else 'per-matrix'} "
        f"scales; median of {args.steps} round-robin steps, "
        f"load average {load_before:.1f} -> {load_after:.1f}\n"
    )
    header = f"{'setup':<34} {'wall ms':>9} {'x base':>7} {'CPU ms':>8} {'x base':>7} {'goal':>6}"
    print(header)
    print("-" * len(header))
    goals = {3: 1.5, 8: 2.5}
    (base_wall, base_cpu) = med["base"]
    for name, (wall, cpu) in med.items():
        n = None if name == "base" else int(name.split()[0])
        label = f"base only, {args.rows} rows" if n is None else f"{args.rows} rows over {n} distinct deltas"
        goal = f"{goals[n]:.1f}" if n in goals else ""
        print(
            f"{label:<34} {wall * 1e3:>9.1f} {wall / base_wall:>7.2f} "
            f"{cpu * 1e3:>8.1f} {cpu / base_cpu:>7.2f} {goal:>6}"
        )
    base_bytes = dm.base_bytes
    print(
        f"\nfloor by bytes read: the base step reads {base_bytes / 2**20:.0f} MiB of weights; each distinct "
        f"delta adds {block_params / 8 / 2**20:.1f} MiB of bits, i.e. "
        + ", ".join(f"{1 + n * block_params / 8 / base_bytes:.2f}x for {n}" for n in args.deltas)
    )


if __name__ == "__main__":
    main()
