"""Per-tensor reconstruction error of the low-rank codecs beside BitDelta and DeltaDQ at equal
bytes, on a real base/fine-tune pair (e.g. the one eval/pair.py or `deltactl demo` builds).

For a sample of block weights it prints the relative squared error ‖Δ − Δ̂‖² / ‖Δ‖² of every
codec at each size (bits per weight on that tensor, all stored tensors counted), as a table:
mean over the tensors, and per projection kind.

    python bench/lowrank_error_bench.py BASE_DIR FINETUNED_DIR --layers 0,7,15,23,29
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codec import bitdelta, deltadq, hybrid, lowrank  # noqa: E402
from codec.checkpoint import Checkpoint  # noqa: E402
from codec.lowrank_params import budget_bits  # noqa: E402

KINDS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


#: Per-input-column weights of the error (calibration E[x²]), or None: set once in main().
WEIGHT: dict[str, torch.Tensor] = {}


def rel(delta: torch.Tensor, approx: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """‖Δ − Δ̂‖²/‖Δ‖², or with `weight` Σ w_i (Δ − Δ̂)²_{·,i} / Σ w_i Δ²_{·,i}."""
    w = 1.0 if weight is None else weight.float()[None, :]
    return float(
        ((delta - approx).pow(2) * w).sum(dtype=torch.float64) / (delta.pow(2) * w).sum(dtype=torch.float64)
    )


def svd_fp16_same_bytes(delta: torch.Tensor, ratio: float, weight) -> tuple[float, float]:
    """Plain low-rank: the truncated SVD in fp16 factors, as many ranks as the budget holds."""
    out, inn = delta.shape
    r = budget_bits(out, inn, ratio) // (16 * (out + inn))
    a, b = lowrank.Svd.of(delta).factors(r)
    return rel(delta, b.half().float() @ a.half().float(), weight), 16 * r * (out + inn) / (out * inn)


def measure(
    name: str, ft: torch.Tensor, base: torch.Tensor, ratios: list[float]
) -> dict[str, tuple[float, float]]:
    """{method: (relative error, bits per weight)} for one tensor; with calibration weights the
    error is the weighted one for every method, and DeltaDQ and lowrank-mp also search by it."""
    delta = lowrank.delta_of(ft, base)
    out, inn = delta.shape
    w = WEIGHT.get(name)
    res: dict[str, tuple[float, float]] = {}
    for planes, mode in ((1, "per-matrix"), (1, "per-row"), (2, "per-matrix")):
        sign, scale = bitdelta.binarize(ft, base, planes, mode)
        bpw = (sign.numel() * 8 + scale.numel() * 32) / (out * inn)
        res[f"bitdelta {planes}p {mode}"] = (rel(delta, bitdelta.decode(sign, scale, inn), w), bpw)
    for ratio in ratios:
        tag = f"{ratio:g}x"
        res[f"svd fp16 {tag}"] = svd_fp16_same_bytes(delta, ratio, w)
        searches = [("", None)] + ([(" cal", w)] if w is not None else [])
        for suffix, weight in searches:
            choice = lowrank.choose(ft, base, name, ratio=ratio, weight=weight, allow_signs=False)
            enc = choice.encoded
            bits = enc.layout.stored_bits(out, inn) / (out * inn)
            res[f"lowrank-mp {tag}{suffix}"] = (rel(delta, enc.b @ enc.a, w), bits)
            res[f"lowrank-mp {tag}{suffix} layout"] = (f"{enc.layout.describe()} [{enc.factorization}]", 0.0)
            if ratio >= 16:
                p = deltadq.choose(
                    ft,
                    base,
                    name,
                    0,
                    ratio=ratio,
                    bits=None,
                    keep_ratio=None,
                    group_size=None,
                    parts=1,
                    channel_weight=weight,
                )
                codes, step = deltadq.encode(ft, base, name, 0, p)
                approx = deltadq.decode(codes, step, name, 0, p, inn)
                res[f"deltadq {tag}{suffix}"] = (rel(delta, approx, w), p.bits_per_weight(out, inn))
        if ratio < 16:
            r = hybrid.rank_for_ratio(out, inn, ratio, 1, False)
            h = hybrid.encode(ft, base, r)
            bits = hybrid.stored_bits(out, inn, r, 1, False) / (out * inn)
            res[f"hybrid {tag}"] = (rel(delta, hybrid.decode(h, inn), w), bits)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
    ap.add_argument("finetuned", type=Path)
    ap.add_argument("--layers", default="0,7,15,23,29")
    ap.add_argument("--ratios", default="8,16,32")
    ap.add_argument(
        "--calibrate", type=Path, help="calibration text: errors weighted by the fine-tune's E[x²] on it"
    )
    ap.add_argument("--samples", type=int, default=32)
    args = ap.parse_args()
    if args.calibrate:
        from codec.activations import input_moments

        moments = input_moments(args.finetuned, args.calibrate, samples=args.samples, seq_len=128)
        WEIGHT.update(moments.moments)
        print(f"calibration: {moments.tokens} tokens of {args.calibrate}", file=sys.stderr)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base, ft = Checkpoint.open(args.base), Checkpoint.open(args.finetuned)
    ratios = [float(r) for r in args.ratios.split(",")]
    rows: dict[str, list[float]] = defaultdict(list)
    bpw: dict[str, list[float]] = defaultdict(list)
    per_kind: dict[tuple[str, str], list[float]] = defaultdict(list)
    layouts: dict[str, list[str]] = defaultdict(list)
    t0 = time.time()
    for layer in args.layers.split(","):
        for kind in KINDS:
            name = f"model.layers.{layer}.{kind}.weight"
            res = measure(name, ft.get(name), base.get(name), ratios)
            for method, (err, bits) in res.items():
                if method.endswith("layout"):
                    layouts[method].append(f"{name.split('.', 2)[2]}: {err}")
                    continue
                rows[method].append(err)
                bpw[method].append(bits)
                per_kind[method, kind].append(err)
            print(f"{name}: done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    n = len(next(iter(rows.values())))
    weighted = ", each column weighted by calibration E[x²]," if WEIGHT else ""
    print(f"\n{n} tensors of {args.finetuned} vs {args.base}")
    print(f"relative error ‖Δ − Δ̂‖²/‖Δ‖²{weighted} (mean over tensors)\n")
    print(
        "| method | bits/weight (mean) | mean rel. error | "
        + " | ".join(k.split(".")[1] for k in KINDS)
        + " |"
    )
    print("|---|---|---|" + "---|" * len(KINDS))
    order = sorted(rows, key=lambda m: (-sum(bpw[m]) / n, sum(rows[m]) / n))
    for method in order:
        kinds = " | ".join(f"{sum(per_kind[method, k]) / len(per_kind[method, k]):.4f}" for k in KINDS)
        print(f"| {method} | {sum(bpw[method]) / n:.4f} | {sum(rows[method]) / n:.4f} | {kinds} |")
    print("\nlowrank-mp layouts chosen:")
    for method, items in layouts.items():
        print(f"  {method}:")
        for item in items:
            print(f"    {item}")


if __name__ == "__main__":
    main()
