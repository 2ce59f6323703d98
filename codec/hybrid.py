"""Hybrid delta math (docs/lowrank.md): a rank-r truncated SVD of the delta in fp16 factors plus
BitDelta sign planes of what it leaves, Δ̂ = b @ a + Σ_p scale_p ⊙ sign_p.

The residual's planes are plain `N.sign` / `N.scale` tensors, so the loader's sign kernel serves
them as it serves BitDelta; the factors are `N.lr_a` / `N.lr_b` (F16).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import bitdelta
from .errors import CodecError
from .lowrank import ROW_BLOCK, Svd, delta_of, delta_rows
from .lowrank import reconstruct_blocks as _lowrank_blocks

FP16_MAX = 65504.0


def sign_bits(out_features: int, in_features: int, planes: int, per_row: bool) -> int:
    """Stored bits of the residual's sign planes and their F32 scales."""
    return planes * (
        out_features * 8 * bitdelta.packed_width(in_features) + 32 * (out_features if per_row else 1)
    )


def stored_bits(out_features: int, in_features: int, rank: int, planes: int, per_row: bool) -> int:
    """Every stored bit of a hybrid tensor: F16 factors and the sign planes with their scales."""
    return 16 * rank * (out_features + in_features) + sign_bits(out_features, in_features, planes, per_row)


def rank_for_ratio(out_features: int, in_features: int, ratio: float, planes: int, per_row: bool) -> int:
    """The largest rank whose stored size stays within 16·out·in/ratio bits (0 when the signs
    alone fill the budget: at ratio 16 one plane already does)."""
    budget = int(16 * out_features * in_features // ratio)
    room = budget - sign_bits(out_features, in_features, planes, per_row)
    return max(0, min(min(out_features, in_features), room // (16 * (out_features + in_features))))


@dataclass(frozen=True)
class Hybrid:
    """One tensor in hybrid form, as stored: a F16 [r, in], b F16 [out, r], sign U8 [P, out,
    ceil(in/8)], scale F32 [P, 1 | out]."""

    a: torch.Tensor
    b: torch.Tensor
    sign: torch.Tensor
    scale: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def encode(
    finetuned: torch.Tensor,
    base: torch.Tensor,
    rank: int,
    planes: int = 1,
    scale_mode: bitdelta.ScaleMode = "per-matrix",
    svd: Svd | None = None,
) -> Hybrid:
    """Factor the delta's top `rank` singular vectors (√S folded into each side, rounded to fp16),
    then binarize what their product — computed exactly as decoding computes it — leaves."""
    delta = delta_of(finetuned, base)
    out, inn = delta.shape
    if not 1 <= rank <= min(out, inn):
        raise CodecError(f"rank must be between 1 and {min(out, inn)} for a {out}x{inn} tensor, got {rank}")
    a32, b32 = (svd or Svd.of(delta)).factors(rank)
    if max(float(a32.abs().max()), float(b32.abs().max())) > FP16_MAX:
        raise CodecError(f"the delta's factors exceed the fp16 range ({FP16_MAX:g}): not a fine-tune's delta")
    a, b = a32.to(torch.float16), b32.to(torch.float16)
    residual = delta
    for r in range(0, out, ROW_BLOCK):
        rows = slice(r, min(out, r + ROW_BLOCK))
        residual[rows] -= delta_rows(a, b, rows)
    sign, scale = bitdelta.binarize(residual, None, planes, scale_mode)
    return Hybrid(a, b, sign, scale)


def sign_rows(sign: torch.Tensor, scale: torch.Tensor, in_features: int, rows: slice) -> torch.Tensor:
    """The sign term of rows `rows` in fp32, planes summed in order (bitdelta.decode)."""
    scale_rows = scale[:, rows] if scale.shape[1] != 1 else scale
    return bitdelta.decode(sign[:, rows], scale_rows, in_features)


def decode(h: Hybrid, in_features: int) -> torch.Tensor:
    """Δ̂ in fp32: per ROW_BLOCK rows, torch.matmul(b, a) (fp16 factors widened to fp32) + the
    sign term, in that order."""
    out = h.b.shape[0]
    return torch.cat(
        [
            delta_rows(h.a, h.b, slice(r, min(out, r + ROW_BLOCK)))
            + sign_rows(h.sign, h.scale, in_features, slice(r, min(out, r + ROW_BLOCK)))
            for r in range(0, out, ROW_BLOCK)
        ]
    )


def reconstruct_blocks(
    base: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    sign: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
) -> Iterator[torch.Tensor]:
    """Row blocks of `(W_base.float() + (b @ a + sign term)).to(dtype)` (docs/lowrank.md)."""
    out, inn = base.shape
    signs = (sign_rows(sign, scale, inn, slice(r, min(out, r + ROW_BLOCK))) for r in range(0, out, ROW_BLOCK))
    return _lowrank_blocks(base, a, b, dtype, residual=signs)
