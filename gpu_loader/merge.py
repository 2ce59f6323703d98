"""Merge mode: add a delta into a base weight in place, `W ← (W.float() + Δ̂).to(dtype)` (exactly
the format's reconstruction, for every codec), and restore the original bits exactly afterwards.

Restoring keeps no copy of the weight: `(W_merged.float() − Δ̂).to(dtype)` gives back the base
except where rounding lost information (mostly where `W + Δ̂` crossed into a coarser binade: about
2% of fp16/bf16 weights for typical fine-tunes); those positions, found at merge time by doing the
restore and comparing bit patterns, are recorded with their original values (6 bytes each).
Δ̂ comes from a `DeltaRows` callable built from the tensor's terms (`codec.terms`): sign planes,
low-rank factors and DeltaDQ payloads merge alike, and a tensor of several terms merges their sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from codec import lowrank
from codec.bitdelta import decode
from codec.format import DeltaFile
from codec.terms import DeltaDQTerm, LowRankTerm, SignTerm, Term

from .deltadq import DQSource, DQWeight

#: `(r0, r1) -> Δ̂[r0:r1]` in fp32 on the weight's device; called once at merge, once at restore.
DeltaRows = Callable[[int, int], torch.Tensor]

_BITS = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
_CHUNK_BYTES = 64 << 20  # fp32 temporaries per step
#: Rows per block of a low-rank product: docs/lowrank.md fixes Δ̂ = b @ a as one fp32 torch.matmul per
#: ROW_BLOCK output rows on the CPU (the BLAS's summation order is part of the result), so merged
#: mode computes exactly those blocks to equal `deltactl apply` bit for bit.
LOWRANK_ROW_BLOCK = lowrank.ROW_BLOCK


@dataclass
class MergeRecord:
    """What `unmerge_` needs: the delta's rows, and the positions the float round trip loses."""

    delta_rows: DeltaRows
    index: torch.Tensor  # int32 (int64 for huge tensors) flat positions the round trip does not restore
    values: torch.Tensor  # the original values there

    @property
    def corrections(self) -> int:
        return int(self.index.numel())


def _chunks(rows: int, cols: int):
    step = max(1, _CHUNK_BYTES // max(cols * 4, 1))
    if step >= LOWRANK_ROW_BLOCK:  # whole low-rank product blocks per step: none computed twice
        step -= step % LOWRANK_ROW_BLOCK
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _scale_rows(scale: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    return scale if scale.shape[1] == 1 else scale[:, r0:r1]


def _undo(merged: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (merged.float() - delta).to(merged.dtype)


def sign_rows(sign: torch.Tensor, scale: torch.Tensor, in_features: int, device: torch.device) -> DeltaRows:
    """Δ̂ rows of a sign delta (uint8 [P, out, ceil(in/8)], f32 scales [P, 1 | out])."""
    sign, scale = sign.to(device), scale.to(device, torch.float32)
    return lambda r0, r1: decode(sign[:, r0:r1], _scale_rows(scale, r0, r1), in_features)


def dq_rows(weight: DQWeight) -> DeltaRows:
    """Δ̂ rows of a resident DeltaDQ tensor (on the device it lives on)."""
    return lambda r0, r1: weight.decode(slice(r0, r1))


def lowrank_rows(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> DeltaRows:
    """Δ̂ rows of low-rank factors (a [rank, in], b [out, rank]): `codec.lowrank.delta_rows` on the
    CPU per block of LOWRANK_ROW_BLOCK rows (the reconstruction's own blocks, whichever rows are
    asked for), moved to `device`."""
    a, b = a.to("cpu", torch.float32), b.to("cpu", torch.float32)
    block, out = LOWRANK_ROW_BLOCK, b.shape[0]

    def rows(r0: int, r1: int) -> torch.Tensor:
        k0 = r0 // block
        starts = range(k0 * block, r1, block)
        parts = [lowrank.delta_rows(a, b, slice(k, min(out, k + block))) for k in starts]
        product = parts[0] if len(parts) == 1 else torch.cat(parts)
        return product[r0 - k0 * block : r1 - k0 * block].to(device)

    return rows


def term_rows(
    delta: DeltaFile, terms: Sequence[Term], shape: tuple[int, int], device: torch.device
) -> DeltaRows:
    """Δ̂ rows of a tensor of `delta` as the sum of its terms, added in their order in fp32 (the
    low-rank product first, then the sign planes of the residual, as the codecs reconstruct)."""
    parts: list[DeltaRows] = []
    for t in terms:
        match t:
            case SignTerm():
                parts.append(sign_rows(delta.tensor(t.sign_key), delta.tensor(t.scale_key), shape[1], device))
            case LowRankTerm():
                parts.append(lowrank_rows(*t.factors(), device))
            case DeltaDQTerm():
                parts.append(dq_rows(DQSource(delta, t.name, shape).build().to(device)))
            case _:
                raise TypeError(f"cannot merge a {type(t).__name__} term")
    return sum_rows(parts)


def sum_rows(parts: Sequence[DeltaRows]) -> DeltaRows:
    """Δ̂ rows of a sum of terms: each term's rows in fp32, added left to right."""
    if len(parts) == 1:
        return parts[0]

    def rows(r0: int, r1: int) -> torch.Tensor:
        out = parts[0](r0, r1)
        for part in parts[1:]:
            out = out + part(r0, r1)
        return out

    return rows


@torch.no_grad()
def merge_(weight: torch.Tensor, delta_rows: DeltaRows) -> MergeRecord:
    """`weight ← (weight.float() + Δ̂).to(weight.dtype)` in place, row block by row block."""
    if weight.dtype not in _BITS or weight.dim() != 2:
        raise TypeError(f"merge needs a 2-D float weight, got {weight.dtype}{list(weight.shape)}")
    if not weight.is_contiguous():
        raise ValueError("merge needs a contiguous weight")
    out, inn = weight.shape
    ints = _BITS[weight.dtype]
    index_dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
    index, values = [], []
    for r0, r1 in _chunks(out, inn):
        w = weight[r0:r1]
        delta = delta_rows(r0, r1)
        merged = (w.float() + delta).to(w.dtype)
        lost = (_undo(merged, delta).view(ints) != w.view(ints)).reshape(-1).nonzero().squeeze(1)
        index.append((lost + r0 * inn).to(index_dtype))
        values.append(w.reshape(-1)[lost].clone())
        w.copy_(merged)
    return MergeRecord(delta_rows, torch.cat(index), torch.cat(values))


@torch.no_grad()
def unmerge_(weight: torch.Tensor, record: MergeRecord) -> None:
    """Undo `merge_`: the weight's bits are the original ones again."""
    out, inn = weight.shape
    for r0, r1 in _chunks(out, inn):
        w = weight[r0:r1]
        w.copy_(_undo(w, record.delta_rows(r0, r1)))
    weight.view(-1)[record.index.long()] = record.values


def merge_sign_(weight: torch.Tensor, sign: torch.Tensor, scale: torch.Tensor) -> MergeRecord:
    """`merge_` of a sign delta."""
    if weight.dtype not in _BITS or weight.dim() != 2:
        raise TypeError(f"merge needs a 2-D float weight, got {weight.dtype}{list(weight.shape)}")
    return merge_(weight, sign_rows(sign, scale, weight.shape[1], weight.device))


unmerge_sign_ = unmerge_
