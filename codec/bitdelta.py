"""BitDelta math: binarize a weight delta into packed sign planes plus scales, and decode it.

Signs are packed LSB-first along the input axis (bit j of byte b = column 8b+j), 1 = +scale.
Everything here is plain torch and runs on any device.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

ScaleMode = Literal["per-matrix", "per-row"]
_SHIFTS = {}


def _shifts(device: torch.device) -> torch.Tensor:
    t = _SHIFTS.get(device)
    if t is None:
        t = _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return t


def packed_width(in_features: int) -> int:
    return (in_features + 7) // 8


def pack_signs(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor `[..., n]` into uint8 `[..., ceil(n/8)]`, LSB-first, zero padding."""
    if bits.dtype != torch.bool:
        raise TypeError(f"pack_signs expects a bool tensor, got {bits.dtype}")
    n = bits.shape[-1]
    pad = -n % 8
    b = bits.to(torch.uint8)
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    b = b.reshape(*bits.shape[:-1], -1, 8) << _shifts(bits.device)
    # Bits never overlap, so the byte sum is their OR and cannot exceed 255.
    return b.sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_signs`: uint8 `[..., ceil(n/8)]` -> bool `[..., n]`."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_signs expects uint8, got {packed.dtype}")
    bits = (packed.unsqueeze(-1) >> _shifts(packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :n].bool()


_PM1_LUTS: dict[torch.device, torch.Tensor] = {}


def pm1_lut(device: torch.device | str = "cpu") -> torch.Tensor:
    """[256, 8] fp32 on `device`: entry [b, j] is +1 when bit j of byte b is set (LSB-first, the
    format's bit order), else −1. Indexing it with packed sign bytes expands them to ±1."""
    device = torch.device(device)
    lut = _PM1_LUTS.get(device)
    if lut is None:
        bits = (torch.arange(256, dtype=torch.int32).unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1
        lut = _PM1_LUTS[device] = (bits * 2 - 1).to(torch.float32).to(device)
    return lut


_ROW_CHUNK = 64  # rows per step: keeps the fp32 working set in cache (measured fastest)


def _mean_abs(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """mean|x| accumulated in fp64, rounded to fp32 (the format's scale initialisation)."""
    n = x.numel() if dim is None else x.shape[dim]
    total = x.abs().sum(dtype=torch.float64) if dim is None else x.abs().sum(dim=dim, dtype=torch.float64)
    return (total / max(n, 1)).to(torch.float32)


def binarize(
    finetuned: torch.Tensor,
    base: torch.Tensor | None = None,
    planes: int = 1,
    scale_mode: ScaleMode = "per-matrix",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual binarization of the 2-D delta `finetuned - base` (or of `finetuned` alone).

    Plane p takes the sign of what planes < p left (bit 1 where the residual is >= 0) and
    the mean absolute value of that residual as its scale, per matrix or per output row;
    the delta is formed in fp32 and the mean accumulated in fp64.
    Returns `(sign uint8 [P, out, ceil(in/8)], scale f32 [P, 1 | out])`.
    """
    if finetuned.dim() != 2:
        raise ValueError(f"binarize expects a 2-D tensor, got shape {tuple(finetuned.shape)}")
    if base is not None and base.shape != finetuned.shape:
        raise ValueError(f"shape mismatch: {tuple(finetuned.shape)} vs base {tuple(base.shape)}")
    if planes < 1:
        raise ValueError("planes must be >= 1")
    if scale_mode not in ("per-matrix", "per-row"):
        raise ValueError(f"unknown scale mode {scale_mode!r}")
    per_row = scale_mode == "per-row"
    out, inn = finetuned.shape
    if planes == 1 and finetuned.device.type == "cpu":
        return _binarize_one_plane_chunked(finetuned, base, per_row)

    residual = finetuned.to(torch.float32, copy=True)
    if base is not None:
        residual.sub_(base)
    signs, scales = [], []
    for p in range(planes):
        positive = residual >= 0
        scale = _mean_abs(residual, 1 if per_row else None).reshape(-1)
        signs.append(pack_signs(positive))
        scales.append(scale)
        if p + 1 < planes:
            step = scale.reshape(-1, 1).expand_as(residual)
            residual.sub_(torch.where(positive, step, -step))
    return torch.stack(signs), torch.stack(scales)


def _binarize_one_plane_chunked(ft: torch.Tensor, base: torch.Tensor | None, per_row: bool):
    """Single-plane fast path: one pass over row blocks, never the whole fp32 delta in memory."""
    out, inn = ft.shape
    signs = np.empty((1, out, packed_width(inn)), dtype=np.uint8)
    buf = torch.empty(min(_ROW_CHUNK, max(out, 1)), inn, dtype=torch.float32)
    row_sums = torch.empty(out, dtype=torch.float64)
    for r in range(0, out, _ROW_CHUNK):
        e = min(out, r + _ROW_CHUNK)
        d = buf[: e - r]
        d.copy_(ft[r:e])
        if base is not None:
            d.sub_(base[r:e])
        torch.sum(d.abs(), dim=1, dtype=torch.float64, out=row_sums[r:e])
        signs[0, r:e] = np.packbits((d >= 0).numpy(), axis=-1, bitorder="little")
    if per_row:
        scale = (row_sums / max(inn, 1)).to(torch.float32)
    else:
        scale = (row_sums.sum() / max(out * inn, 1)).to(torch.float32).reshape(1)
    return torch.from_numpy(signs), scale.reshape(1, -1)


def decode(sign: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """Δ̂ in fp32: Σ_p scale[p] · (2·bit_p − 1), planes summed in order p = 0, 1, …"""
    planes, out, width = sign.shape
    lut = pm1_lut(sign.device)
    delta = torch.zeros(out, in_features, dtype=torch.float32, device=sign.device)
    for p in range(planes):
        pm1 = torch.index_select(lut, 0, sign[p].reshape(-1).long()).view(out, width * 8)[:, :in_features]
        delta.add_(pm1 * scale[p].to(torch.float32).reshape(-1, 1))  # ±1 × s is exact: ±s
    return delta


def reconstruct(
    base: torch.Tensor, sign: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The fine-tuned weight as the format defines it: `(W_base.float() + Δ̂).to(dtype)`."""
    return (base.to(torch.float32) + decode(sign, scale, base.shape[-1])).to(dtype)


def reconstruct_blocks(
    base: torch.Tensor,
    sign: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """`reconstruct` for CPU tensors, yielded in blocks of rows while they are hot in cache.

    Each block is written into `out[r:e]` when `out` is given, else into one reused buffer
    (consume it before advancing). Bit-identical to `reconstruct`: Δ̂ is summed over planes
    first (fp32), then added to the base in fp32 and rounded once to `dtype`.
    """
    rows_total, inn = base.shape
    planes, _, width = sign.shape
    scale = scale.to(torch.float32)
    per_row = scale.shape[1] != 1
    rows = _ROW_CHUNK
    # Signs are expanded a byte at a time through a [256, 8] table (one gather, no dense ±1
    # tensor): ±scale directly for a per-matrix scale, ±1 then × the row's scale for per-row
    # scales. Both are exact, so the result is bit-identical to `reconstruct`.
    pm1 = pm1_lut(base.device)
    luts = [pm1 if per_row else pm1 * scale[p].reshape(()) for p in range(planes)]
    n = min(rows, max(rows_total, 1))
    wide = torch.empty(n, width * 8, dtype=torch.float32)
    extra = torch.empty_like(wide) if planes > 1 else None
    block = None if out is not None else torch.empty(n, inn, dtype=dtype)
    for r in range(0, rows_total, rows):
        e = min(rows_total, r + rows)
        for p in range(planes):
            target_buf = wide if p == 0 else extra
            buf = target_buf[: e - r]
            torch.index_select(luts[p], 0, sign[p, r:e].reshape(-1).long(), out=buf.view(-1, 8))
            if per_row:
                buf.mul_(scale[p, r:e].reshape(-1, 1))
            if p:
                wide[: e - r].add_(buf)
        target = out[r:e] if out is not None else block[: e - r]
        torch.add(wide[: e - r, :inn], base[r:e], out=target)  # computed in fp32, rounded once to dtype
        yield target


def reconstruct_cpu(
    base: torch.Tensor, sign: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """`reconstruct` for CPU tensors, computed in cache-sized row blocks (bit-identical)."""
    result = torch.empty(base.shape, dtype=dtype)
    for _ in reconstruct_blocks(base, sign, scale, dtype, out=result):
        pass
    return result
