"""GPU benchmark of the loader (run it through bench/gpu_run.sh on a CUDA machine):

1. the kernel / GPU tests, compiled (TRITON_INTERPRET=0);
2. multi-tenant decode step of Llama-2-7B-shaped decoder layers (hidden 4096, intermediate
   11008, random fp16 weights): batch 1/8/32 rows over 1/8/32 distinct deltas, against the
   base alone and against naive per-tenant dense weights; effective bandwidth (bytes of base +
   distinct deltas read per step / time) as a fraction of HBM peak; the same step with DeltaDQ
   deltas (ratio 32: 1-bit codes, half the weights kept) served by decode-then-GEMM, and with
   rank-64 low-rank deltas served by the shrink/expand kernel pair;
3. hot-swap of one 7B delta from pinned host memory into a slot vs a plain pinned copy_ of the
   same bytes;
4. how many 7B deltas fit beside the base: computed from the slot size, verified by allocation;
   DeltaDQ deltas in table-only slots, computed from the payload size.

    python bench/gpu_bench.py --out results/           # CUDA
    python bench/gpu_bench.py --smoke --out /tmp/gb     # tiny shapes on CPU: tests the script

Writes results.json and results.md under --out (default $OUT, else ./gpu_bench_out).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from codec.deltadq import params_for  # noqa: E402
from gpu_loader.deltadq import DQWeight, payload_bytes  # noqa: E402
from gpu_loader.layout import words_per_row  # noqa: E402
from gpu_loader.modules import add_dq_matmul_  # noqa: E402
from gpu_loader.pool_layout import PoolLayout  # noqa: E402
from gpu_loader.segments import build_segments  # noqa: E402
from gpu_loader.sgmv import sgmv_sign, triton_available  # noqa: E402
from gpu_loader.sgmv_lowrank import sgmv_lowrank  # noqa: E402
from gpu_loader.sizes import format_size  # noqa: E402
from gpu_loader.slot_pool import SlotPool  # noqa: E402

#: HBM peak bandwidth by device-name fragment (bytes/s), most specific first.
HBM_PEAK = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("A10G", 0.6e12),
    ("L4", 0.3e12),
]


@dataclass(frozen=True)
class Config:
    device: torch.device
    dtype: torch.dtype
    hidden: int
    intermediate: int
    vocab: int
    model_layers: int  # layers of the full model (capacity, hot-swap, projection)
    timed_layers: int  # distinct decoder layers the step runs through (flushes L2 between uses)
    naive_layers: int
    batches: tuple[int, ...]
    distinct: tuple[int, ...]
    warmup: int
    reps: int
    reserve: int  # bytes kept free for activations / KV cache in the capacity figure

    def shapes(self) -> list[tuple[str, int, int]]:
        h, i = self.hidden, self.intermediate
        return [
            ("q_proj", h, h),
            ("k_proj", h, h),
            ("v_proj", h, h),
            ("o_proj", h, h),
            ("gate_proj", i, h),
            ("up_proj", i, h),
            ("down_proj", h, i),
        ]


def make_config(args) -> Config:
    if args.smoke:
        return Config(
            torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu"),
            torch.float32,
            256,
            688,
            512,
            2,
            2,
            1,
            (1, 4),
            (1, 2, 4),
            1,
            3,
            0,
        )
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU check of this script")
    return Config(
        torch.device("cuda"),
        torch.float16,
        4096,
        11008,
        32000,
        32,
        args.layers,
        2,
        (1, 8, 32),
        (1, 8, 32),
        10,
        args.reps,
        int(args.reserve_gib * (1 << 30)),
    )


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_step(fn, cfg: Config) -> float:
    """Median seconds per call of `fn` (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(cfg.warmup):
        fn()
    sync(cfg.device)
    if cfg.device.type == "cuda":
        times = []
        for _ in range(cfg.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(cfg.reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hbm_peak(dev: torch.device) -> tuple[str, float | None]:
    if dev.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(dev)
    for frag, peak in HBM_PEAK:
        if frag.lower() in name.lower():
            return name, peak
    return name, None


# ------------------------------------------------------------------------------------------
# 1. tests
# ------------------------------------------------------------------------------------------
def run_tests(cfg: Config, smoke: bool) -> dict:
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu_loader"]
    if cfg.device.type == "cuda":
        env["TRITON_INTERPRET"] = "0"  # compiled kernels
        cmd += ["-m", "triton or gpu"]
    else:
        env["TRITON_INTERPRET"] = "1"
        cmd += ["-m", "triton", "-k", "test_kernel_matches_reference and in31"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"[tests] {' '.join(cmd[3:])}: {summary}")
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    return {
        "command": " ".join(cmd[2:]),
        "returncode": proc.returncode,
        "summary": summary,
        "seconds": round(time.perf_counter() - t0, 1),
        "smoke": smoke,
    }


# ------------------------------------------------------------------------------------------
# 2. multi-tenant decode step
# ------------------------------------------------------------------------------------------
@dataclass
class Matrix:
    weight: torch.Tensor  # [out, in]
    words: torch.Tensor  # int32 [S, 1, out, W]
    scales: torch.Tensor  # f32 [S, 1, out]
    active: torch.Tensor  # int32 [S]


def build_layers(cfg: Config, slots: int, gen: torch.Generator) -> list[list[Matrix]]:
    layers = []
    for _ in range(cfg.timed_layers):
        mats = []
        for _, out, inn in cfg.shapes():
            w = (torch.randn(out, inn, generator=gen, device=cfg.device) * 0.02).to(cfg.dtype)
            words = torch.randint(
                -(2**31),
                2**31 - 1,
                (slots, 1, out, words_per_row(inn)),
                generator=gen,
                device=cfg.device,
                dtype=torch.int32,
            )
            scales = torch.rand(slots, 1, out, generator=gen, device=cfg.device) * 1e-3
            mats.append(Matrix(w, words, scales, torch.ones(slots, dtype=torch.int32, device=cfg.device)))
        layers.append(mats)
    return layers


def synthetic_dq(out: int, inn: int, gen: torch.Generator, device: torch.device) -> DQWeight:
    """A DeltaDQ tensor shaped like a ratio-32 one (1-bit codes, one survivor in every pair of
    columns): mask bytes 0x55 / 0xAA at random, random codes and steps. `inn` must be even."""
    words = words_per_row(inn)
    pick = torch.randint(0, 2, (out, 4 * words), generator=gen, device=device, dtype=torch.uint8)
    mask = (0x55 + pick * (0xAA - 0x55)).to(torch.uint8).view(torch.int32)
    kept = inn // 2
    codes = torch.randint(0, 256, (out, (kept + 7) // 8), generator=gen, device=device, dtype=torch.uint8)
    step = torch.rand(out, generator=gen, device=device) * 1e-3
    return DQWeight(mask, codes, step, bits=1, kept=kept, in_features=inn)


#: Rank of the low-rank deltas in the decode step (the pool's max_rank: every slot padded to it).
LOWRANK_RANK = 64


def build_lowrank_layers(cfg: Config, deltas: int, gen: torch.Generator) -> list[list[tuple]]:
    """[layer][matrix] -> (a [S, R, in], b [S, out, R], ranks [S]) in the activation dtype."""
    r, dev = LOWRANK_RANK, cfg.device
    return [
        [
            (
                (torch.randn(deltas, r, inn, generator=gen, device=dev) / inn**0.5).to(cfg.dtype),
                (torch.randn(deltas, out, r, generator=gen, device=dev) * 1e-3).to(cfg.dtype),
                torch.full((deltas,), r, dtype=torch.int32, device=dev),
            )
            for _, out, inn in cfg.shapes()
        ]
        for _ in range(cfg.timed_layers)
    ]


def build_dq_layers(cfg: Config, deltas: int, gen: torch.Generator) -> list[list[list[DQWeight]]]:
    """[layer][matrix][delta]"""
    return [
        [[synthetic_dq(out, inn, gen, cfg.device) for _ in range(deltas)] for _, out, inn in cfg.shapes()]
        for _ in range(cfg.timed_layers)
    ]


# One decode step over the timed layers, three ways; bound to their arguments with
# functools.partial so each timed call sees exactly the tensors of its (batch, deltas) point.
def base_step(layers: list[list[Matrix]], xs: dict[int, torch.Tensor]) -> None:
    for mats in layers:
        for m in mats:
            F.linear(xs[m.weight.shape[1]], m.weight)


def slots_step(
    layers: list[list[Matrix]],
    xs: dict[int, torch.Tensor],
    row_slots: list[int],
    device: torch.device,
    backend: str,
) -> None:
    seg = build_segments(row_slots, 1, device)  # once per step, as in a forward
    for mats in layers:
        for m in mats:
            x = xs[m.weight.shape[1]]
            y = F.linear(x, m.weight)
            sgmv_sign(x, y, m.words, m.scales, m.active, seg, backend=backend)


def lowrank_step(
    layers: list[list[Matrix]],
    lr_layers: list[list[tuple]],
    xs: dict[int, torch.Tensor],
    row_slots: list[int],
    device: torch.device,
    backend: str,
) -> None:
    seg = build_segments(row_slots, 1, device)
    for mats, lr_mats in zip(layers, lr_layers, strict=True):
        for m, (a, b, ranks) in zip(mats, lr_mats, strict=True):
            x = xs[m.weight.shape[1]]
            y = F.linear(x, m.weight)
            sgmv_lowrank(x, y, a, b, ranks, seg, backend=backend)


def dq_step(
    layers: list[list[Matrix]],
    dq_layers: list[list[list[DQWeight]]],
    xs: dict[int, torch.Tensor],
    tenant_rows: list[torch.Tensor],
) -> None:
    for mats, dq_mats in zip(layers, dq_layers, strict=True):
        for m, dqs in zip(mats, dq_mats, strict=True):
            x = xs[m.weight.shape[1]]
            y = F.linear(x, m.weight)
            for t, rows in enumerate(tenant_rows):  # decode-then-GEMM, one distinct delta at a time
                add_dq_matmul_(y, x, rows, dqs[t])


def bench_decode(cfg: Config, backend: str) -> list[dict]:
    gen = torch.Generator(device=cfg.device).manual_seed(0)
    max_d = max(cfg.distinct)
    layers = build_layers(cfg, max_d, gen)
    dq_layers = build_dq_layers(cfg, max_d, gen)
    lr_layers = build_lowrank_layers(cfg, max_d, gen)
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    shapes = cfg.shapes()
    base_bytes = sum(o * i * itemsize for _, o, i in shapes)
    delta_bytes = sum(o * words_per_row(i) * 4 + o * 4 for _, o, i in shapes)
    name, peak = hbm_peak(cfg.device)
    rows = []
    inputs = {
        b: {
            n: torch.randn(b, n, generator=gen, device=cfg.device).to(cfg.dtype)
            for n in {cfg.hidden, cfg.intermediate}
        }
        for b in cfg.batches
    }
    base_times = {}
    for d in cfg.distinct:  # outer, so the naive baseline's weights are built once per d
        for batch in cfg.batches:
            if d > batch:
                continue
            xs = inputs[batch]
            act_bytes = sum(batch * (o + i) * itemsize for _, o, i in shapes)
            if batch not in base_times:
                base_times[batch] = time_step(functools.partial(base_step, layers, xs), cfg)
            t_base = base_times[batch]
            row_slots = [r % d for r in range(batch)]
            tenant_rows = [torch.arange(t, batch, d, device=cfg.device) for t in range(d)]
            t_delta = time_step(
                functools.partial(slots_step, layers, xs, row_slots, cfg.device, backend), cfg
            )
            t_dq = time_step(functools.partial(dq_step, layers, dq_layers, xs, tenant_rows), cfg)
            t_lr = time_step(
                functools.partial(lowrank_step, layers, lr_layers, xs, row_slots, cfg.device, backend), cfg
            )
            t_naive = bench_naive(cfg, batch, d, xs, gen)
            per_layer = lambda t: t / cfg.timed_layers  # noqa: E731
            read = base_bytes + d * delta_bytes + act_bytes
            bw = read / per_layer(t_delta)
            rows.append(
                {
                    "batch": batch,
                    "distinct_deltas": d,
                    "base_ms_per_layer": per_layer(t_base) * 1e3,
                    "deltas_ms_per_layer": per_layer(t_delta) * 1e3,
                    "deltadq_ms_per_layer": per_layer(t_dq) * 1e3,
                    "lowrank_ms_per_layer": per_layer(t_lr) * 1e3,
                    "naive_ms_per_layer": per_layer(t_naive) * 1e3 if t_naive else None,
                    "projected_step_ms": per_layer(t_delta) * cfg.model_layers * 1e3,
                    "bytes_per_layer": read,
                    "effective_GBps": bw / 1e9,
                    "fraction_of_peak": bw / peak if peak else None,
                    "base_fraction_of_peak": (base_bytes + act_bytes) / per_layer(t_base) / peak
                    if peak
                    else None,
                    "device": name,
                }
            )
            r = rows[-1]
            naive = r["naive_ms_per_layer"]
            print(
                f"[decode] batch {batch:>2} deltas {d:>2}: base {r['base_ms_per_layer']:.3f} ms/layer, "
                f"slots {r['deltas_ms_per_layer']:.3f}, deltadq {r['deltadq_ms_per_layer']:.3f}, "
                f"low-rank r{LOWRANK_RANK} {r['lowrank_ms_per_layer']:.3f}, naive "
                f"{naive if naive is None else round(naive, 3)}, "
                f"{r['effective_GBps']:.0f} GB/s"
                + (f" ({r['fraction_of_peak']:.0%} of peak)" if peak else "")
            )
    del layers, dq_layers, lr_layers
    gc.collect()
    return rows


_NAIVE: dict = {}


def bench_naive(cfg: Config, batch: int, d: int, xs: dict, gen: torch.Generator) -> float | None:
    """Per-tenant dense weights: each distinct delta has its own full copy of every matrix, and
    each tenant's rows run their own GEMM. Uses `naive_layers` distinct layers (memory)."""
    key = d
    if key not in _NAIVE:
        _NAIVE.clear()
        gc.collect()
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            _NAIVE[key] = [
                [
                    [
                        (torch.randn(o, i, generator=gen, device=cfg.device) * 0.02).to(cfg.dtype)
                        for _ in range(d)
                    ]
                    for _, o, i in cfg.shapes()
                ]
                for _ in range(cfg.naive_layers)
            ]
        except torch.OutOfMemoryError:
            return None
    layers = _NAIVE[key]
    tenant_rows = [torch.arange(t, batch, d, device=cfg.device) for t in range(d)]

    def step():
        for mats in layers:
            for copies in mats:
                x = xs[copies[0].shape[1]]
                for t, w in enumerate(copies):
                    F.linear(x[tenant_rows[t]], w)

    return time_step(step, cfg) * cfg.timed_layers / cfg.naive_layers


# ------------------------------------------------------------------------------------------
# 3. hot-swap and 4. capacity
# ------------------------------------------------------------------------------------------
def model_layout(cfg: Config, planes: int = 1, max_rank: int = 0) -> PoolLayout:
    def block(n: str) -> str:
        return "self_attn" if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"

    sign = {
        f"model.layers.{layer}.{block(n)}.{n}.weight": (o, i)
        for layer in range(cfg.model_layers)
        for n, o, i in cfg.shapes()
    }
    sign["model.embed_tokens.weight"] = (cfg.vocab, cfg.hidden)
    sign["lm_head.weight"] = (cfg.vocab, cfg.hidden)
    table = {
        f"model.layers.{layer}.{n}.weight": ((cfg.hidden,), cfg.dtype)
        for layer in range(cfg.model_layers)
        for n in ("input_layernorm", "post_attention_layernorm")
    }
    table["model.norm.weight"] = ((cfg.hidden,), cfg.dtype)
    dense = {n: ((cfg.vocab, cfg.hidden), cfg.dtype) for n in ("model.embed_tokens.weight", "lm_head.weight")}
    return PoolLayout(
        sign=sign, table=table, dense=dense, planes=planes, max_rank=max_rank, factor_dtype=cfg.dtype
    )


def base_param_count(cfg: Config) -> int:
    layer = sum(o * i for _, o, i in cfg.shapes()) + 2 * cfg.hidden
    return cfg.model_layers * layer + 2 * cfg.vocab * cfg.hidden + cfg.hidden


def bench_hot_swap(cfg: Config) -> dict:
    layout = model_layout(cfg)
    tables = {n: torch.ones(s, dtype=d, device=cfg.device) for n, (s, d) in layout.table.items()}
    pool = SlotPool(
        layout, device=cfg.device, max_slots=2, memory_budget=2 * layout.slot_bytes, base_tables=tables
    )
    gen = torch.Generator().manual_seed(1)
    signs = {
        n: torch.randint(0, 256, (1, o, (i + 7) // 8), generator=gen, dtype=torch.uint8)
        for n, (o, i) in layout.sign.items()
    }
    scales = {n: torch.rand(1, o, generator=gen) * 1e-3 for n, (o, _) in layout.sign.items()}
    t0 = time.perf_counter()
    staged = pool.stage_tensors("synthetic-7b", sign=signs, scale=scales)
    stage_s = time.perf_counter() - t0
    del signs
    swaps = []
    for _ in range(max(3, min(cfg.reps, 10))):
        sync(cfg.device)
        t0 = time.perf_counter()
        pool.install(staged)
        sync(cfg.device)
        swaps.append(time.perf_counter() - t0)
    pin = cfg.device.type == "cuda"
    src = torch.empty(staged.nbytes, dtype=torch.uint8, pin_memory=pin)
    dst = torch.empty(staged.nbytes, dtype=torch.uint8, device=cfg.device)
    copies = []
    for _ in range(len(swaps)):
        sync(cfg.device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=pin)
        sync(cfg.device)
        copies.append(time.perf_counter() - t0)
    swap, copy = statistics.median(swaps), statistics.median(copies)
    out = {
        "delta_bytes": staged.nbytes,
        "stage_from_memory_s": stage_s,
        "hot_swap_ms": swap * 1e3,
        "hot_swap_GBps": staged.nbytes / swap / 1e9,
        "plain_copy_ms": copy * 1e3,
        "plain_copy_GBps": staged.nbytes / copy / 1e9,
        "swap_over_copy": swap / copy,
        "tensors_copied": 2 * len(layout.sign) + len(layout.table) + 1,
    }
    print(
        f"[hot-swap] {format_size(staged.nbytes)}: slot install {out['hot_swap_ms']:.1f} ms "
        f"({out['hot_swap_GBps']:.1f} GB/s) vs plain pinned copy_ {out['plain_copy_ms']:.1f} ms "
        f"({out['plain_copy_GBps']:.1f} GB/s)"
    )
    del pool, staged, src, dst
    gc.collect()
    return out


def bench_capacity(cfg: Config) -> dict:
    gc.collect()
    layout = model_layout(cfg)
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    base_bytes = base_param_count(cfg) * itemsize
    dense_bytes = sum(s[0] * s[1] * itemsize for s, _ in layout.dense.values())
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.empty(base_bytes, dtype=torch.uint8, device=cfg.device)  # the resident base
        free, total = torch.cuda.mem_get_info(cfg.device)
    else:
        base = None
        free, total = 256 << 20, 256 << 20  # smoke: pretend 256 MiB are free
    room = max(free - cfg.reserve, 0)
    fits = room // layout.slot_bytes
    fits_dense = room // (layout.slot_bytes + dense_bytes)
    # DeltaDQ at ratio 32 (1 bit, half kept; any (bits, keep) of that budget costs the same) in
    # table-only slots: mask words + column-ordered codes + steps per compressed matrix.
    dq_bytes = layout.table_slot_bytes + sum(
        payload_bytes(o, i, params_for(i, 1, 0.5, 16, 1))
        for n, (o, i) in layout.sign.items()
        if n not in layout.dense
    )
    fits_dq = room // dq_bytes
    fits_dq_dense = room // (dq_bytes + dense_bytes)
    # Slots with rank-64 factor space too (hybrid: factors + residual signs; every slot pays both).
    lr_slot_bytes = model_layout(cfg, max_rank=LOWRANK_RANK).slot_bytes
    fits_lr = room // lr_slot_bytes
    verified, error = False, None
    try:
        pool = SlotPool(
            layout,
            device=cfg.device,
            max_slots=max(fits, 1),
            memory_budget=max(fits, 1) * layout.slot_bytes,
            base_tables={n: torch.ones(s, dtype=d, device=cfg.device) for n, (s, d) in layout.table.items()},
        )
        verified = pool.num_slots == fits
        del pool
    except Exception as exc:  # report, do not crash the run
        error = f"{type(exc).__name__}: {exc}"
    del base
    gc.collect()
    out = {
        "base_bytes": base_bytes,
        "free_after_base": free,
        "reserve": cfg.reserve,
        "slot_bytes": layout.slot_bytes,
        "deltas_fit": int(fits),
        "lowrank_slot_bytes": lr_slot_bytes,
        "lowrank_fit": int(fits_lr),
        "verified_by_allocation": verified,
        "error": error,
        "deltas_fit_with_dense_embed_lm_head": int(fits_dense),
        "dense_embed_lm_head_bytes": dense_bytes,
        "deltas_in_8GiB": int((8 << 30) // layout.slot_bytes),
        "total_device_bytes": total,
        "deltadq_slot_bytes": dq_bytes,
        "deltadq_fit": int(fits_dq),
        "deltadq_fit_with_dense_embed_lm_head": int(fits_dq_dense),
    }
    print(
        f"[capacity] base {format_size(base_bytes)}, free after base {format_size(free)}, slot "
        f"{format_size(layout.slot_bytes)}: {fits} deltas fit (allocation {'ok' if verified else 'FAILED'}), "
        f"{fits_dense} if each keeps embed/lm_head dense; {out['deltas_in_8GiB']} in an 8 GiB budget"
    )
    print(
        f"[capacity] DeltaDQ (ratio 32) in table-only slots: {format_size(dq_bytes)} each, {fits_dq} fit "
        f"(computed), {fits_dq_dense} if each keeps embed/lm_head dense"
    )
    print(
        f"[capacity] slots with rank-{LOWRANK_RANK} factor space (low-rank / hybrid): "
        f"{format_size(lr_slot_bytes)} each, {fits_lr} fit (computed)"
    )
    return out


# ------------------------------------------------------------------------------------------
def write_report(out_dir: Path, results: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    sh = results["shapes"]
    shape = (
        f"hidden {sh['hidden']}, intermediate {sh['intermediate']}, vocab {sh['vocab']}, "
        f"{sh['model_layers']} layers, {results['dtype'].replace('torch.', '')}"
    )
    kind = "Llama-2-7B-shaped" if sh["hidden"] == 4096 else "smoke-test shapes"
    lines = [
        f"# gpu_loader benchmark — {results['device']} ({kind}: {shape}; backend {results['backend']})",
        "",
    ]
    t = results.get("tests")
    if t:
        lines += [f"Tests: `{t['command']}` → {t['summary']} (rc {t['returncode']})", ""]
    lines += [
        "## Decode step: the 7 projections of a decoder layer, ms per layer "
        f"(step = x{sh['model_layers']} layers)",
        "",
        "| batch | distinct deltas | base alone | base + delta slots | naive dense per tenant | "
        "slots, whole step | effective GB/s | of HBM peak | base alone, of HBM peak | "
        f"DeltaDQ decode-then-GEMM | low-rank r{LOWRANK_RANK} (shrink + expand) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.get("decode", []):
        naive = f"{r['naive_ms_per_layer']:.3f}" if r["naive_ms_per_layer"] is not None else "OOM"
        frac = f"{r['fraction_of_peak']:.0%}" if r["fraction_of_peak"] is not None else "n/a"
        base_frac = f"{r['base_fraction_of_peak']:.0%}" if r["base_fraction_of_peak"] is not None else "n/a"
        lines.append(
            f"| {r['batch']} | {r['distinct_deltas']} | {r['base_ms_per_layer']:.3f} | "
            f"{r['deltas_ms_per_layer']:.3f} | {naive} | {r['projected_step_ms']:.2f} ms | "
            f"{r['effective_GBps']:.0f} | {frac} | {base_frac} | {r['deltadq_ms_per_layer']:.3f} | "
            f"{r['lowrank_ms_per_layer']:.3f} |"
        )
    h = results.get("hot_swap")
    if h:
        lines += [
            "",
            "## Hot-swap of one whole-model delta (pinned host → slot)",
            "",
            "| bytes | slot install | plain pinned copy_ | install / copy |",
            "|---:|---:|---:|---:|",
            f"| {format_size(h['delta_bytes'])} | "
            f"{h['hot_swap_ms']:.1f} ms ({h['hot_swap_GBps']:.1f} GB/s) | "
            f"{h['plain_copy_ms']:.1f} ms ({h['plain_copy_GBps']:.1f} GB/s) | {h['swap_over_copy']:.2f} |",
        ]
    c = results.get("capacity")
    if c:
        lines += [
            "",
            "## Deltas that fit beside the base",
            "",
            f"- base {format_size(c['base_bytes'])}; free after base {format_size(c['free_after_base'])}; "
            f"kept free {format_size(c['reserve'])}; one slot {format_size(c['slot_bytes'])}",
            f"- **{c['deltas_fit']} deltas fit** (verified by allocation: {c['verified_by_allocation']}); "
            f"{c['deltas_fit_with_dense_embed_lm_head']} if each keeps embeddings + lm_head dense; "
            f"{c['deltas_in_8GiB']} in an 8 GiB budget",
            "- DeltaDQ at ratio 32 in table-only slots (`sign_slots`): "
            f"{format_size(c['deltadq_slot_bytes'])} each, **{c['deltadq_fit']} fit** (computed); "
            f"{c['deltadq_fit_with_dense_embed_lm_head']} if each "
            "keeps embeddings + lm_head dense",
            f"- slots with rank-{LOWRANK_RANK} factor space too (`max_rank`, low-rank and hybrid deltas): "
            f"{format_size(c['lowrank_slot_bytes'])} each, **{c['lowrank_fit']} fit** (computed)",
        ]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description="gpu_loader GPU benchmark")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU unless CUDA is present)")
    ap.add_argument("--cpu", action="store_true", help="with --smoke: stay on CPU even if CUDA is present")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_bench_out"))
    ap.add_argument("--layers", type=int, default=4, help="distinct decoder layers timed per step")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument(
        "--reserve-gib", type=float, default=2.0, help="kept free for activations in the capacity figure"
    )
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    args = ap.parse_args()
    cfg = make_config(args)
    if cfg.device.type == "cpu":
        torch.set_num_threads(1)  # tiny CPU ops: thread wake-ups would dominate the timings
    backend = args.backend
    if backend == "auto":
        backend = "triton" if triton_available(cfg.device) else "torch"
    name, peak = hbm_peak(cfg.device)
    results: dict = {
        "device": name,
        "hbm_peak_Bps": peak,
        "dtype": str(cfg.dtype),
        "backend": backend,
        "torch": torch.__version__,
        "smoke": args.smoke,
        "shapes": {
            "hidden": cfg.hidden,
            "intermediate": cfg.intermediate,
            "vocab": cfg.vocab,
            "model_layers": cfg.model_layers,
            "timed_layers": cfg.timed_layers,
        },
    }
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        results["triton"] = None
    print(f"device: {name}, backend: {backend}, dtype: {cfg.dtype}")
    if not args.skip_tests:
        results["tests"] = run_tests(cfg, args.smoke)
    results["decode"] = bench_decode(cfg, backend)
    _NAIVE.clear()
    gc.collect()
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()
    results["hot_swap"] = bench_hot_swap(cfg)
    results["capacity"] = bench_capacity(cfg)
    write_report(Path(args.out), results)


if __name__ == "__main__":
    main()
