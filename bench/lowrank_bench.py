"""Cost of a low-rank delta slot in one patched linear layer (torch path, CPU): a batch whose rows
use distinct deltas, timed for base-only rows, BitDelta sign slots, low-rank slots of rank 16 and
64 (shrink then expand per slot) and hybrid slots (rank 16 + signs), in one run.

    .venv/bin/python bench/lowrank_bench.py [--in 2048 --out 2048 --deltas 4 --rows 8] [--threads 1]

Prints time per token of each setup beside the base GEMM alone and the sign path, and the floor
by arithmetic: a rank-r slot adds r·(in + out) multiply-adds per token to the base's in·out.
Setups are timed round-robin and the best of N is kept (shared machines hit all of them alike).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codec.bitdelta import binarize  # noqa: E402
from codec.terms import LowRankTerm  # noqa: E402
from gpu_loader.modules import patch_model  # noqa: E402
from gpu_loader.segments import SlotBatch, use_batch  # noqa: E402
from gpu_loader.slot_pool import SlotPool  # noqa: E402

NAME = "0.weight"


def best_of(fns: dict, reps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Best wall and best CPU seconds of each `fn()` over `reps` round-robin rounds (after one
    warm-up each); with one thread the CPU time is the call's own work, steadier under load."""
    for fn in fns.values():
        fn()
    wall = {k: float("inf") for k in fns}
    cpu = dict(wall)
    for _ in range(reps):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k] = min(wall[k], time.perf_counter() - t0)
            cpu[k] = min(cpu[k], time.process_time() - c0)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--in", dest="inn", type=int, default=2048)
    ap.add_argument("--out", type=int, default=2048)
    ap.add_argument("--deltas", type=int, default=4, help="distinct deltas per batch")
    ap.add_argument("--rows", type=int, default=8, help="batch rows (spread over the deltas)")
    ap.add_argument("--tokens", type=int, default=1, help="tokens per row (1: a decode step)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    inn, out, n = args.inn, args.out, args.deltas

    model = nn.Sequential(nn.Linear(inn, out, bias=False)).to(dtype)
    plan = patch_model(model)
    kinds = ["sign", *(f"lowrank-{r}" for r in args.ranks), f"hybrid-{args.ranks[0]}"]
    layout = plan.layout(1, max(args.ranks))
    pool = SlotPool(
        layout,
        device="cpu",
        max_slots=n * len(kinds),
        memory_budget=n * len(kinds) * layout.slot_bytes,
        base_tables=plan.base_tables(),
    )
    plan.attach(pool, "torch")

    def factors(rank: int) -> dict[str, LowRankTerm]:
        a, b = torch.randn(rank, inn, generator=gen) / inn**0.5, torch.randn(out, rank, generator=gen) * 0.01
        return {NAME: LowRankTerm(rank, lambda: (a, b))}

    def signs() -> tuple[dict, dict]:
        s, c = binarize(torch.randn(out, inn, generator=gen) * 0.01, None, scale_mode="per-row")
        return {NAME: s}, {NAME: c}

    slots: dict[str, list[int]] = {}
    for kind in kinds:
        slots[kind] = []
        for i in range(n):
            sign, scale, lowrank = {}, {}, {}
            if kind in ("sign", f"hybrid-{args.ranks[0]}"):
                sign, scale = signs()
            if kind != "sign":
                lowrank = factors(int(kind.split("-")[1]))
            staged = pool.stage_tensors(f"{kind}-{i}", sign=sign, scale=scale, lowrank=lowrank)
            slots[kind].append(int(pool.install(staged)))

    x = torch.randn(args.rows, args.tokens, inn, generator=gen).to(dtype)

    def forward(row_slots: list[int]):
        rows, views = pool.acquire(row_slots)
        batch = SlotBatch(tuple(rows), pool.device, views)

        def run():
            with use_batch(batch), torch.inference_mode():
                model(x)

        return run

    setups = {"base GEMM": forward([-1] * args.rows)}
    for kind in kinds:
        setups[kind] = forward([slots[kind][i % n] for i in range(args.rows)])
    wall, cpu = best_of(setups, args.reps)
    tokens = args.rows * args.tokens

    print(
        f"one linear [{out}, {inn}] {args.dtype}, {args.rows} rows x {args.tokens} token(s) over {n} "
        f"distinct deltas, torch path, {args.threads} thread(s), best of {args.reps}"
    )
    print(
        f"{'setup':<14} {'wall us/tok':>11} {'x base':>7} {'x sign':>7} {'CPU us/tok':>11} {'x base':>7} "
        f"{'x sign':>7} {'flop floor x base':>18}"
    )
    for kind in setups:
        rank = int(kind.split("-")[1]) if "-" in kind else 0
        floor = f"{1 + rank * (inn + out) / (inn * out):.3f}" if rank else ""
        w, c = wall[kind], cpu[kind]
        print(
            f"{kind:<14} {w / tokens * 1e6:>11.1f} {w / wall['base GEMM']:>7.2f} {w / wall['sign']:>7.2f} "
            f"{c / tokens * 1e6:>11.1f} {c / cpu['base GEMM']:>7.2f} {c / cpu['sign']:>7.2f} {floor:>18}"
        )


if __name__ == "__main__":
    main()
