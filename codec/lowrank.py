"""Low-rank delta math (docs/lowrank.md): the truncated SVD of a weight delta as factors
b [out, r] @ a [r, in], and lowrank-mp's mixed-precision storage of them (bands of singular
vectors quantized group-wise at per-band bit widths, chosen per tensor to fit `--ratio`).

Factors fold the singular values in evenly, b = U·√S and a = √S·Vᵀ, so a singular vector's two
halves have the same magnitude and one bit width serves both. Everything is plain torch on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .deltadq import pack_codes, unpack_codes
from .errors import CodecError
from .lowrank_params import (
    BAND_ROW_BITS,
    SHAPE_BITS,
    Band,
    Layout,
    budget_bits,
    check_sizes,
    packed_bytes,
    rank_cost_bits,
)

#: Rows of Δ̂ = b @ a computed per torch.matmul call: part of the reconstruction spec, so every
#: consumer that must equal `apply` bit for bit computes the product in the same blocks.
ROW_BLOCK = 256
DEFAULT_GROUP_SIZE = 64
_ALPHAS = torch.linspace(0.4, 1.0, 10)  # clipping of the group maximum searched for bits >= 2

# --- factors ----------------------------------------------------------------------------------


def delta_of(finetuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Δ = W_ft − W_base, formed in fp32."""
    if finetuned.dim() != 2 or finetuned.shape != base.shape:
        raise CodecError(
            f"low-rank codecs need two 2-D tensors of one shape, got {tuple(finetuned.shape)} "
            f"and {tuple(base.shape)}"
        )
    return finetuned.to(torch.float32) - base.to(torch.float32)


@dataclass(frozen=True)
class Svd:
    """Δ = u·diag(s)·vh in fp32, singular values descending."""

    u: torch.Tensor  # [out, k]
    s: torch.Tensor  # [k]
    vh: torch.Tensor  # [k, in]

    @classmethod
    def of(cls, delta: torch.Tensor) -> Svd:
        u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
        return cls(u, s, vh)

    @classmethod
    def weighted(cls, delta: torch.Tensor, weight: torch.Tensor) -> Svd:
        """The factorization that is optimal for the weighted error Σ w_i (Δ − Δ̂)²: the SVD of
        Δ·√W, with √W divided back out of vh (so u·diag(s)·vh is still Δ). Channels with no
        energy are floored at 1e-6 of the mean weight so the division stays finite."""
        root = weight.to(torch.float32).clamp_min(1e-6 * float(weight.mean()) + 1e-30).sqrt()
        u, s, vh = torch.linalg.svd(delta.to(torch.float32) * root[None, :], full_matrices=False)
        return cls(u, s, vh / root[None, :])

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a [rank, in], b [out, rank]) with the singular values folded in as √S on each side."""
        root = self.s[:rank].sqrt()
        return root[:, None] * self.vh[:rank], self.u[:, :rank] * root[None, :]


def delta_rows(a: torch.Tensor, b: torch.Tensor, rows: slice) -> torch.Tensor:
    """Δ̂[rows] = torch.matmul(b[rows], a) in fp32 (callers step `rows` by ROW_BLOCK)."""
    return torch.matmul(b[rows].to(torch.float32), a.to(torch.float32))


def reconstruct_blocks(
    base: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    dtype: torch.dtype,
    residual: Iterator[torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """Row blocks (ROW_BLOCK rows) of `(W_base.float() + (b @ a + residual)).to(dtype)`: the
    product in fp32 block by block, plus the residual block (hybrid's sign term) when given,
    then added to the base in fp32 and rounded once."""
    out = base.shape[0]
    for r in range(0, out, ROW_BLOCK):
        rows = slice(r, min(out, r + ROW_BLOCK))
        d = delta_rows(a, b, rows)
        if residual is not None:
            d = d + next(residual)
        yield (base[rows].to(torch.float32) + d).to(dtype)


def weighted_error(delta: torch.Tensor, approx: torch.Tensor, weight: torch.Tensor | None) -> float:
    """Σ_{o,i} w_i (Δ − Δ̂)²_{o,i}: the output error E‖x(Δ − Δ̂)ᵀ‖² for inputs with uncorrelated
    channels of second moments w (codec/activations.py), or the plain squared error (w = 1)."""
    sq = (delta - approx).pow_(2)
    if weight is not None:
        sq.mul_(weight.to(torch.float32)[None, :])
    return float(sq.sum(dtype=torch.float64))


# --- group-wise quantization ------------------------------------------------------------------


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


def quantize(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of `x` [n, L] in groups of `group_size` on the zero-free symmetric grid
    v̂ = step·(q − (2^bits − 1)/2). Returns (codes uint8 [n, L], steps fp32 [n, ceil(L/g)]);
    every step is a bf16 value and the codes are fitted to that rounded step."""
    n, length = x.shape
    ngroups = -(-length // group_size)
    pad = ngroups * group_size - length
    xp = torch.nn.functional.pad(x.to(torch.float32), (0, pad)).view(n, ngroups, group_size)
    valid = torch.ones(length, dtype=torch.float32)
    valid = torch.nn.functional.pad(valid, (0, pad)).view(1, ngroups, group_size)
    centre = (2**bits - 1) / 2
    top = 2**bits - 1
    counts = valid.sum(-1)  # [1, G]
    if bits == 1:  # ±mean|v| is the least-squares sign fit (as BitDelta): step/2 = mean|v|
        steps = [_bf16(2 * xp.abs().sum(-1) / counts)]
    else:
        vmax = xp.abs().amax(-1)
        steps = [_bf16(alpha * vmax / centre) for alpha in _ALPHAS.tolist()]
    best_err = best_step = best_q = None
    for step in steps:
        safe = torch.where(step > 0, step, torch.ones_like(step))[..., None]
        q = torch.clamp(torch.round(xp / safe + centre), 0, top)
        err = ((xp - step[..., None] * (q - centre)).pow(2) * valid).sum(-1)
        if best_err is None:
            best_err, best_step, best_q = err, step, q
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_step = torch.where(better, step, best_step)
            best_q = torch.where(better[..., None], q, best_q)
    codes = best_q.view(n, -1)[:, :length].to(torch.uint8)
    return codes, best_step


def dequantize(codes: torch.Tensor, steps: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """fp32 [n, L]: steps[row, j // group_size] · (q − (2^bits − 1)/2), one fp32 rounding."""
    n, length = codes.shape
    centre = torch.tensor((2**bits - 1) / 2, dtype=torch.float32)
    per_element = steps.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :length]
    return per_element * (codes.to(torch.float32) - centre)


# --- lowrank-mp encode / decode ---------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """One tensor in lowrank-mp form: what `N.lr_codes`, `N.lr_scales`, `N.lr_bands` hold, and
    the fp32 factors they decode to (bit-identical to `decode_factors`)."""

    layout: Layout
    codes: torch.Tensor  # U8 [total bytes]
    steps: torch.Tensor  # BF16 [total groups]
    a: torch.Tensor  # fp32 [rank, in]
    b: torch.Tensor  # fp32 [out, rank]
    factorization: str = "svd"  # or "weighted-svd" (calibrated: the SVD of Δ·√W)

    @property
    def bands(self) -> torch.Tensor:
        """`N.lr_bands`: I32 [B, 4] rows (rank_start, rank_end, bits, group_size)."""
        return torch.tensor(self.layout.rows(), dtype=torch.int32).reshape(-1, 4)

    @property
    def shape(self) -> torch.Tensor:
        """`N.lr_shape`: I32 [2] = (out, in) of the tensor, so the factors decode from the file alone."""
        return torch.tensor([self.b.shape[0], self.a.shape[1]], dtype=torch.int32)


def _refit_b(delta: torch.Tensor, a_hat: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """argmin_b Σ w_i (Δ − b·â)²: b = Δ·W·âᵀ (â·W·âᵀ)⁻¹, so b absorbs a's quantization error."""
    aw = a_hat if weight is None else a_hat * weight.to(torch.float32)[None, :]
    gram = (aw.to(torch.float64) @ a_hat.to(torch.float64).T).contiguous()
    rhs = (aw @ delta.T).to(torch.float64)  # [r, out]
    ridge = 1e-9 * float(gram.diagonal().mean()) + 1e-30
    gram.diagonal().add_(ridge)
    return torch.linalg.solve(gram, rhs).T.to(torch.float32)


def encode(
    delta: torch.Tensor,
    svd: Svd,
    layout: Layout,
    weight: torch.Tensor | None = None,
    factorization: str = "svd",
) -> Encoded:
    """Quantize the SVD factors of `delta` to `layout`: every band's `a` rows first, then `b`
    refitted against the quantized `a` (least squares, weighted by `weight` when given) and
    quantized column by column at the same bands' widths."""
    out, inn = delta.shape
    layout.check(out, inn)
    a0, _ = svd.factors(layout.rank)
    a_codes, a_steps, a_hat = [], [], []
    for band in layout.bands:
        codes, steps = quantize(a0[band.start : band.end], band.bits, band.group_size)
        a_codes.append(codes)
        a_steps.append(steps)
        a_hat.append(dequantize(codes, steps, band.bits, band.group_size))
    a = torch.cat(a_hat)
    b_fit = _refit_b(delta, a, weight)
    byte_chunks, step_chunks, b_cols = [], [], []
    for band, codes, steps in zip(layout.bands, a_codes, a_steps, strict=True):
        bt = b_fit[:, band.start : band.end].T.contiguous()  # column k of b as row k
        b_codes, b_steps = quantize(bt, band.bits, band.group_size)
        b_cols.append(dequantize(b_codes, b_steps, band.bits, band.group_size))
        byte_chunks += [
            pack_codes(codes.numpy(), band.bits).reshape(-1),
            pack_codes(b_codes.numpy(), band.bits).reshape(-1),
        ]
        step_chunks += [steps.reshape(-1), b_steps.reshape(-1)]
    b = torch.cat(b_cols).T.contiguous()
    packed = torch.from_numpy(np.concatenate(byte_chunks))
    steps = torch.cat(step_chunks).to(torch.bfloat16)
    return Encoded(layout, packed, steps, a, b, factorization)


def decode_factors(
    codes: torch.Tensor, steps: torch.Tensor, layout: Layout, out: int, inn: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a fp32 [rank, in], b fp32 [out, rank]) from the stored codes and bf16 steps."""
    check_sizes(codes.numel(), steps.numel(), layout, out, inn)
    raw = codes.numpy().reshape(-1)
    steps32 = steps.to(torch.float32).reshape(-1)
    a_rows, b_cols = [], []
    byte, step = 0, 0
    for band in layout.bands:
        for length, dest in ((inn, a_rows), (out, b_cols)):
            width = packed_bytes(length, band.bits)
            ngroups = -(-length // band.group_size)
            block = raw[byte : byte + band.count * width].reshape(band.count, width)
            q = torch.from_numpy(unpack_codes(block, band.bits, length))
            s = steps32[step : step + band.count * ngroups].reshape(band.count, ngroups)
            dest.append(dequantize(q, s, band.bits, band.group_size))
            byte += band.count * width
            step += band.count * ngroups
    return torch.cat(a_rows), torch.cat(b_cols).T.contiguous()


# --- choosing a band layout -------------------------------------------------------------------

#: Band plans searched for each tensor: (bits, count) in rank order; count None = as many as
#: the budget still allows. Delta-CoMe's shape (8 bits for the top few, then 3, then 2) and
#: single-width layouts; the budget decides the fill, the tensor's error decides the plan.
BAND_PLANS: tuple[tuple[tuple[int, int | None], ...], ...] = (
    # Single widths 1 and 8 are left out: on SmolLM2's fine-tune they never won (63 tensors at
    # 8x, 16x, 32x) and 1 bit is the costliest to screen (the most singular vectors).
    *(((w, None),) for w in (2, 3, 4)),
    *(((8, n), (w, None)) for n in (2, 8) for w in (2, 3)),
    *(((8, n8), (3, n3), (2, None)) for n8 in (2, 4) for n3 in (8, 32, 64)),
    *(((4, n4), (2, None)) for n4 in (16, 64)),
    *(((3, n3), (2, None)) for n3 in (16, 64, 128)),
    *(((8, 2), (3, n3), (2, None)) for n3 in (96, 128)),
)


def layouts_for_budget(out: int, inn: int, budget: int, group_size: int) -> list[Layout]:
    """Distinct layouts from BAND_PLANS whose stored size fits `budget` bits (fill band sized to
    the budget, ranks capped at min(out, in)); plans whose fixed bands overspend are skipped."""
    full_rank = min(out, inn)
    seen, result = set(), []
    for plan in BAND_PLANS:
        counts, used, spent = [], 0, 0
        for bits, count in plan:
            cost = rank_cost_bits(out, inn, bits, group_size)
            overhead = BAND_ROW_BITS * len(plan) + SHAPE_BITS
            if count is None:
                count = max(0, (budget - spent - overhead) // cost)
            count = min(count, full_rank - used)
            counts.append((bits, count))
            used += count
            spent += count * cost
        layout = Layout.from_counts(counts, group_size)
        if not layout.bands or layout.stored_bits(out, inn) > budget:
            continue
        key = tuple(map(tuple, layout.rows()))
        if key not in seen:
            seen.add(key)
            result.append(layout)
    return result


@dataclass(frozen=True)
class Choice:
    """What one tensor is stored as: `lowrank` (with `encoded`), or the safety rule's `signs`
    (1-bit per-matrix BitDelta, when that is closer at about the same bytes); errors by the proxy."""

    kind: str
    error: float
    encoded: Encoded | None = None
    sign: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    alternatives: tuple[tuple[str, float], ...] = ()


#: Layouts kept from the screening pass for the full encode (with b refitted).
FINALISTS = 2
DEFAULT_GROUP_SIZES = (128,)


def _screen(delta: torch.Tensor, svd: Svd, layouts: list[Layout], weight) -> list[tuple[float, Layout]]:
    """Error of every layout with both factors quantized straight from the SVD (no refit): each
    singular vector's quantization depends only on its bits and group size, so it is done once
    per (bits, group size) and sliced for every layout."""
    need: dict[tuple[int, int], int] = {}
    for layout in layouts:
        for band in layout.bands:
            key = (band.bits, band.group_size)
            need[key] = max(need.get(key, 0), band.end)
    a0, b0 = svd.factors(max(need.values()))
    cache = {}
    for (bits, g), rank in need.items():
        qa = quantize(a0[:rank], bits, g)
        qb = quantize(b0[:, :rank].T.contiguous(), bits, g)
        cache[bits, g] = (dequantize(*qa, bits, g), dequantize(*qb, bits, g))
    scored = []
    for layout in layouts:
        a = torch.cat([cache[band.bits, band.group_size][0][band.start : band.end] for band in layout.bands])
        bt = torch.cat([cache[band.bits, band.group_size][1][band.start : band.end] for band in layout.bands])
        scored.append((_product_error(delta, a, bt.T.contiguous(), weight), layout))
    scored.sort(key=lambda t: t[0])
    return scored


def choose(
    finetuned: torch.Tensor,
    base: torch.Tensor,
    name: str,
    *,
    ratio: float,
    group_sizes: tuple[int, ...] = DEFAULT_GROUP_SIZES,
    weight: torch.Tensor | None = None,
    allow_signs: bool = True,
) -> Choice:
    """Encode one tensor at `ratio` vs fp16. Every layout of BAND_PLANS × `group_sizes` that fits
    the budget is screened by `weighted_error`; the FINALISTS best are encoded in full (b refitted)
    and the closest kept. Safety rule: at ratios ≤ 16, 1-bit per-matrix signs (BitDelta, about
    the same bytes) replace it when they are closer."""
    from .bitdelta import binarize, decode

    delta = delta_of(finetuned, base)
    out, inn = delta.shape
    budget = budget_bits(out, inn, ratio)
    layouts = [lay for g in group_sizes for lay in layouts_for_budget(out, inn, budget, g)]
    if not layouts:
        bits = min(w for plan in BAND_PLANS for w, _ in plan)
        least = rank_cost_bits(out, inn, bits, max(group_sizes)) + BAND_ROW_BITS + SHAPE_BITS
        raise CodecError(
            f"{name}: ratio {ratio:g} leaves {budget} bits for a {out}x{inn} tensor, less than one "
            f"singular vector pair at {bits} bits ({least} bits)"
        )
    # With calibration the weighted SVD competes with the plain one: it is the better rank-r
    # approximation under the weighted error, but its `a` rows carry 1/√w_i, which quantizes worse.
    sources = {"svd": Svd.of(delta)}
    if weight is not None:
        sources["weighted-svd"] = Svd.weighted(delta, weight)
    scored = sorted(
        (
            (err, layout, key)
            for key, svd in sources.items()
            for err, layout in _screen(delta, svd, layouts, weight)
        ),
        key=lambda t: t[0],
    )
    best: Encoded | None = None
    best_err = math.inf
    for _, layout, key in scored[:FINALISTS]:
        enc = encode(delta, sources[key], layout, weight, key)
        err = _product_error(delta, enc.a, enc.b, weight)
        if err < best_err:
            best, best_err = enc, err
    alternatives = [("lowrank", best_err)]
    if allow_signs and ratio <= 16:
        sign, scale = binarize(finetuned, base)
        sign_err = weighted_error(delta, decode(sign, scale, inn), weight)
        alternatives.append(("signs", sign_err))
        if sign_err < best_err:
            return Choice("signs", sign_err, sign=sign, scale=scale, alternatives=tuple(alternatives))
    return Choice("lowrank", best_err, encoded=best, alternatives=tuple(alternatives))


def product_stats(
    delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None
) -> tuple[float, float, float]:
    """(⟨Δ, b·a⟩_w, ‖b·a‖²_w, ‖Δ‖²_w) without forming b·a: ⟨Δ·w·aᵀ, b⟩ and ⟨bᵀb, a·w·aᵀ⟩ are
    skinny products (summed in fp64); w = the calibration weight per input column, or 1."""
    a, b = a.to(torch.float32), b.to(torch.float32)
    aw = a if weight is None else a * weight.to(torch.float32)[None, :]
    dw = delta if weight is None else delta * weight.to(torch.float32)[None, :]
    target_sq = float((dw * delta).sum(dtype=torch.float64))
    dot = float(((delta @ aw.T).to(torch.float64) * b.to(torch.float64)).sum())
    gram_b = b.to(torch.float64).T @ b.to(torch.float64)
    gram_a = aw.to(torch.float64) @ a.to(torch.float64).T
    return dot, float((gram_b * gram_a).sum()), target_sq


def _product_error(delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight) -> float:
    """weighted_error(Δ, b @ a) from `product_stats`."""
    dot, decoded_sq, target_sq = product_stats(delta, a, b, weight)
    return max(0.0, target_sq - 2 * dot + decoded_sq)


__all__ = [
    "Band",
    "Choice",
    "Encoded",
    "Layout",
    "Svd",
    "choose",
    "decode_factors",
    "delta_rows",
    "encode",
    "layouts_for_budget",
    "product_stats",
    "quantize",
    "reconstruct_blocks",
]
