"""DeltaDQ: group-wise dropout + separate quantization of a weight delta (docs/deltadq.md).

Per 2-D delta Δ [out, in]:
  1. Group-wise dropout: each row is cut into groups of `group_size` consecutive input columns;
     in every group exactly `keep` elements survive (a partial last group of L columns keeps
     ceil(L·keep/group_size)), chosen by a counter-based hash of (seed, tensor name, row,
     column) — so the mask is never stored — and rescaled by group_size/keep (L/k_L).
  2. Quantization: each row's surviving values are quantized to `bits` bits on a symmetric
     grid without a zero level, v̂ = step_row · (q − (2^bits − 1)/2), with the per-row step
     chosen to minimise squared error.
  3. Separate parts: the bits-bit codes are split into `parts` parts of bits/parts bits each
     (part j holds bits [j·b, (j+1)·b) of q), stored as separate packed planes.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from .deltadq_params import DQParams
from .errors import CodecError

MASK_ALGORITHM = "splitmix64-v1"
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_ROW_CHUNK = 256


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 output function of state `x` (vectorised, uint64, wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def tensor_key(seed: int, name: str) -> np.uint64:
    """Per-tensor stream key: splitmix64(seed XOR first 8 bytes (LE) of sha256(name))."""
    name_key = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
    return splitmix64(np.array([(seed ^ name_key) & (2**64 - 1)], dtype=np.uint64))[0]


def _partial_shuffle_keep(gkeys: np.ndarray, length: int, keep: int) -> np.ndarray:
    """For each group key, the `keep` positions drawn (in draw order) by a partial Fisher-Yates
    shuffle of range(length) driven by the SplitMix64 stream seeded with the key: the t-th draw
    is splitmix64(key + t·0x9E3779B97F4A7C15) mod (length − t). Returns int array [..., keep]."""
    dtype = np.int16 if length < 2**15 else np.int32
    perm = np.empty(gkeys.shape + (length,), dtype=dtype)
    perm[...] = np.arange(length, dtype=dtype)
    flat = perm.reshape(-1, length)
    rows = np.arange(flat.shape[0])
    with np.errstate(over="ignore"):
        for t in range(keep):
            h = splitmix64(gkeys.reshape(-1) + np.uint64(t) * _GOLDEN)
            pick = t + (h % np.uint64(length - t)).astype(np.intp)
            picked = flat[rows, pick]
            flat[rows, pick] = flat[:, t]
            flat[:, t] = picked
    return perm[..., :keep]


def kept_positions(seed: int, name: str, shape: tuple[int, int], params: DQParams, rows: slice | None = None):
    """Surviving positions of rows `rows`, group by group, in draw order.

    Returns `(full, last)`: `full` [rows, in // g, keep] holds in-group offsets of the full
    groups; `last` [rows, k_last] the offsets within the partial last group (or None). Row o,
    group j uses the stream key splitmix64(tensor_key XOR (o << 32 | j)).
    """
    out, inn = shape
    if inn >= 2**32 or out >= 2**32:
        raise CodecError("tensor dimensions must be below 2^32 for the DeltaDQ mask")
    r0, r1 = (rows.start or 0, rows.stop if rows.stop is not None else out) if rows else (0, out)
    key = tensor_key(seed, name)
    g, k = params.group_size, params.keep
    full, last = divmod(inn, g)
    ngroups = full + (1 if last else 0)
    counters = (np.arange(r0, r1, dtype=np.uint64)[:, None] << np.uint64(32)) | np.arange(
        ngroups, dtype=np.uint64
    )[None, :]
    gkeys = splitmix64(counters ^ key)
    full_pos = _partial_shuffle_keep(gkeys[:, :full], g, k) if full else np.zeros((r1 - r0, 0, k), np.int16)
    last_pos = _partial_shuffle_keep(gkeys[:, full], last, math.ceil(last * k / g)) if last else None
    return full_pos, last_pos


def keep_mask(
    seed: int, name: str, shape: tuple[int, int], params: DQParams, rows: slice | None = None
) -> np.ndarray:
    """Boolean mask [rows, in] of the surviving positions (for tests and inspection)."""
    full_pos, last_pos = kept_positions(seed, name, shape, params, rows)
    n, inn = full_pos.shape[0], shape[1]
    g, full = params.group_size, full_pos.shape[1]
    mask = np.zeros((n, inn), dtype=bool)
    np.put_along_axis(mask[:, : full * g].reshape(n, full, g), full_pos.astype(np.intp), True, axis=-1)
    if last_pos is not None:
        np.put_along_axis(mask[:, full * g :], last_pos.astype(np.intp), True, axis=-1)
    return mask


def _gather(delta: np.ndarray, full_pos: np.ndarray, last_pos: np.ndarray | None, g: int) -> np.ndarray:
    n, full = delta.shape[0], full_pos.shape[1]
    vals = np.take_along_axis(
        delta[:, : full * g].reshape(n, full, g), full_pos.astype(np.intp), axis=-1
    ).reshape(n, -1)
    if last_pos is not None:
        vals = np.concatenate(
            [vals, np.take_along_axis(delta[:, full * g :], last_pos.astype(np.intp), axis=-1)], axis=1
        )
    return vals


def _scatter(
    out: np.ndarray, values: np.ndarray, full_pos: np.ndarray, last_pos: np.ndarray | None, g: int
) -> None:
    n, full, k = full_pos.shape
    np.put_along_axis(
        out[:, : full * g].reshape(n, full, g),
        full_pos.astype(np.intp),
        values[:, : full * k].reshape(n, full, k),
        axis=-1,
    )
    if last_pos is not None:
        np.put_along_axis(out[:, full * g :], last_pos.astype(np.intp), values[:, full * k :], axis=-1)


def _quantize_rows(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric zero-free grid per row: returns (codes uint8 [rows, K], step float32 [rows])."""
    levels = 2**bits
    centre = (levels - 1) / 2
    if bits == 1:  # closed form: ±mean|v| minimises squared error for signs
        step = 2 * np.abs(values).mean(axis=1, dtype=np.float64).astype(np.float32)
        return (values >= 0).astype(np.uint8), step
    vmax = np.abs(values).max(axis=1).astype(np.float32)
    best_err = np.full(values.shape[0], np.inf)
    best_step = np.zeros(values.shape[0], dtype=np.float32)
    for alpha in np.linspace(0.3, 1.0, 15, dtype=np.float32):
        step = np.maximum(alpha * vmax / centre, np.float32(1e-30))
        q = np.clip(np.rint(values / step[:, None] + centre), 0, levels - 1)
        err = ((values - step[:, None] * (q - centre)) ** 2).sum(axis=1)
        better = err < best_err
        best_err[better], best_step[better] = err[better], step[better]
    codes = np.clip(np.rint(values / best_step[:, None] + centre), 0, levels - 1).astype(np.uint8)
    return codes, best_step


def pack_codes(codes: np.ndarray, width: int) -> np.ndarray:
    """Pack `width`-bit codes [rows, K] LSB-first into uint8 [rows, ceil(K·width/8)]."""
    bits = ((codes[..., None] >> np.arange(width, dtype=np.uint8)) & 1).astype(bool)
    return np.packbits(bits.reshape(codes.shape[0], -1), axis=-1, bitorder="little")


def unpack_codes(packed: np.ndarray, width: int, count: int) -> np.ndarray:
    bits = np.unpackbits(packed, axis=-1, count=count * width, bitorder="little").reshape(
        packed.shape[0], count, width
    )
    return (bits.astype(np.uint8) << np.arange(width, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)


def encode(
    finetuned: torch.Tensor, base: torch.Tensor, name: str, seed: int, params: DQParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress one 2-D delta: returns (parts uint8 [parts, out, packed_width], step f32 [out])."""
    parts, steps, _ = encode_measured(finetuned, base, name, seed, params)
    return parts, steps


def encode_measured(
    finetuned: torch.Tensor,
    base: torch.Tensor,
    name: str,
    seed: int,
    params: DQParams,
    channel_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float, float]]:
    """`encode`, plus (⟨Δ̂, Δ⟩, ‖Δ̂‖², ‖Δ‖²) weighted per input column by `channel_weight`, from
    the survivors' decoded values as `decode` computes them (no second pass over the mask)."""
    out, inn = finetuned.shape
    width = params.packed_width(inn)
    parts = np.zeros((params.parts, out, width), dtype=np.uint8)
    steps = np.zeros(out, dtype=np.float32)
    b = params.part_bits
    centre = np.float32((2**params.bits - 1) / 2)
    weight = np.ones(inn, np.float32) if channel_weight is None else channel_weight.to(torch.float32).numpy()
    dot = decoded_sq = target_sq = 0.0
    # Survivors are rescaled by group size / kept (L / k_L in a partial last group), as dropout does.
    full, last = divmod(inn, params.group_size)
    rescale = np.full(params.kept_per_row(inn), params.group_size / params.keep, dtype=np.float32)
    if last:
        rescale[full * params.keep :] = last / math.ceil(last * params.keep / params.group_size)
    for r in range(0, out, _ROW_CHUNK):
        e = min(out, r + _ROW_CHUNK)
        delta = (finetuned[r:e].to(torch.float32) - base[r:e].to(torch.float32)).numpy()
        full_pos, last_pos = kept_positions(seed, name, (out, inn), params, slice(r, e))
        survivors = _gather(delta, full_pos, last_pos, params.group_size)
        codes, steps[r:e] = _quantize_rows(survivors * rescale, params.bits)
        for j in range(params.parts):
            parts[j, r:e] = pack_codes((codes >> (j * b)) & ((1 << b) - 1), b)
        decoded = steps[r:e, None] * (codes.astype(np.float32) - centre)
        w = _gather(np.broadcast_to(weight, delta.shape), full_pos, last_pos, params.group_size)
        dot += float(np.sum(decoded * survivors * w, dtype=np.float64))
        decoded_sq += float(np.sum(decoded * decoded * w, dtype=np.float64))
        target_sq += float(np.sum(delta * delta * weight, dtype=np.float64))
    return torch.from_numpy(parts), torch.from_numpy(steps), (dot, decoded_sq, target_sq)


def decode(
    parts: torch.Tensor,
    step: torch.Tensor,
    name: str,
    seed: int,
    params: DQParams,
    in_features: int,
    rows: slice | None = None,
) -> torch.Tensor:
    """Δ̂ in fp32 [out, in] (or the given row range): zeros except the surviving positions."""
    out = parts.shape[1]
    r0, r1 = (rows.start or 0, rows.stop if rows.stop is not None else out) if rows else (0, out)
    kept = params.kept_per_row(in_features)
    b = params.part_bits
    codes = np.zeros((r1 - r0, kept), dtype=np.uint16)
    parts_np = parts.numpy()
    for j in range(params.parts):
        codes += unpack_codes(parts_np[j, r0:r1], b, kept).astype(np.uint16) << (j * b)
    centre = (2**params.bits - 1) / 2
    values = step.numpy()[r0:r1, None].astype(np.float32) * (codes.astype(np.float32) - np.float32(centre))
    delta = np.zeros((r1 - r0, in_features), dtype=np.float32)
    full_pos, last_pos = kept_positions(seed, name, (out, in_features), params, slice(r0, r1))
    _scatter(delta, values, full_pos, last_pos, params.group_size)
    return torch.from_numpy(delta)


def reconstruct_blocks(
    base: torch.Tensor,
    parts: torch.Tensor,
    step: torch.Tensor,
    name: str,
    seed: int,
    params: DQParams,
    dtype: torch.dtype,
):
    """Row blocks of `(W_base.float() + Δ̂).to(dtype)`, as `bitdelta.reconstruct_blocks` does."""
    out, inn = base.shape
    for r in range(0, out, _ROW_CHUNK):
        e = min(out, r + _ROW_CHUNK)
        d = decode(parts, step, name, seed, params, inn, slice(r, e))
        yield (base[r:e].to(torch.float32) + d).to(dtype)


# --- choosing parameters ---------------------------------------------------------------------


#: For a target ratio vs fp16 (16 bits/weight): (bits, keep ratio) candidates of that budget.
def candidates_for_ratio(ratio: float, in_features: int | None = None) -> list[tuple[int, float]]:
    """(bits, keep ratio) pairs spending a tensor's budget of 16/ratio bits per weight, after the
    per-row fp32 step (32/in bits per weight) when `in_features` is given."""
    budget = 16.0 / ratio - (32.0 / in_features if in_features else 0.0)
    if budget <= 0:
        raise CodecError(
            f"ratio {ratio} is out of reach for a tensor {in_features} wide: its per-row step alone "
            f"takes 32/{in_features} bits per weight (at most ratio {in_features / 2:g})"
        )
    out = []
    for bits in (1, 2, 3, 4, 6, 8):
        keep = budget / bits
        if keep <= 0.5 + 1e-9 and keep >= 1 / 1024:
            out.append((bits, keep))
    if not out:
        raise CodecError(f"ratio {ratio} is out of range (16 to 16384)")
    return out


def params_for(in_features: int, bits: int, keep_ratio: float, group_size: int, parts: int) -> DQParams:
    g = min(group_size, in_features)
    keep = max(1, round(g * keep_ratio))
    return DQParams(group_size=g, keep=keep, bits=bits, parts=parts if bits % parts == 0 else 1)


def choose(
    finetuned: torch.Tensor,
    base: torch.Tensor,
    name: str,
    seed: int,
    *,
    ratio: float | None,
    bits: int | None,
    keep_ratio: float | None,
    group_size: int | None,
    parts: int,
    group_candidates: tuple[int, ...] = (16, 32, 64, 128, 256, 512),
    channel_weight: torch.Tensor | None = None,
) -> DQParams:
    """Pick parameters for one tensor. Explicit values are used as given; `ratio` chooses among
    (bits, keep) pairs whose stored size (codes and per-row step) is within that budget, and
    `group_size=None` ("auto") among group sizes, by the error of Δ̂ on a sample of rows: the
    squared error weighted by `channel_weight` (E[x_i²] of the layer's inputs on calibration
    text, see codec/activations.py) — the expected output error E‖x(Δ−Δ̂)ᵀ‖² for inputs with
    uncorrelated channels — or, without calibration, unweighted (isotropic inputs)."""
    out, inn = finetuned.shape
    pairs = [(bits, keep_ratio)] if ratio is None else candidates_for_ratio(ratio, inn)
    if ratio is None and (bits is None or keep_ratio is None):
        raise CodecError("give --ratio, or both --bits and --keep")
    groups = (group_size,) if group_size else tuple(g for g in group_candidates if g <= inn) or (inn,)
    rows = slice(0, min(out, 64))
    ft, b = finetuned[rows], base[rows]
    target = ft.to(torch.float32) - b.to(torch.float32)
    best, best_err = None, math.inf
    for bb, kr in pairs:
        for g in groups:
            if g * kr < 1:
                continue
            p = params_for(inn, bb, kr, g, parts)
            if ratio is not None and p.bits_per_weight(1, inn) > 16.0 / ratio:
                continue  # rounding the kept count up overspends: the ratio is a promise
            sub_parts, sub_step = encode(ft, b, name, seed, p)
            sq = (decode(sub_parts, sub_step, name, seed, p, inn) - target).pow(2)
            err = float(sq.sum() if channel_weight is None else (sq * channel_weight.to(torch.float32)).sum())
            if err < best_err:
                best, best_err = p, err
    if best is None and ratio is not None:
        raise CodecError(f"{name}: no (bits, keep, group size) reaches ratio {ratio} on a tensor {inn} wide")
    if best is None:
        raise CodecError(
            f"{name}: no group size fits keep ratio {keep_ratio} (group size × keep must be >= 1)"
        )
    return best
