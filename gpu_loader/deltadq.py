"""DeltaDQ deltas in the loader (docs/deltadq.md): the dropout mask is decoded once, when a delta
is staged, into a bitmask beside the survivors' codes in column order; Δ̂ rows are decoded from
that form with torch ops on the delta's device, bit-identical to `codec.deltadq.decode`.

    source = DQSource(delta_file, name, (out, in))   # nothing read yet
    weight = source.build()                           # host DQWeight: mask words, codes, steps
    delta = weight.to("cuda").decode()                # fp32 Δ̂ [out, in], zeros off the mask
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from codec import deltadq as codec_dq
from codec.deltadq import DQParams
from codec.format import DeltaFile

from .layout import words_per_row

_ROW_CHUNK = 256  # rows per step of the host-side mask decode (numpy temporaries stay small)
_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """Threads for the host-side mask decode: numpy releases the GIL in its loops, so row blocks
    decode in parallel (a 7B delta is minutes of single-threaded work)."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            workers = max(
                1,
                min(
                    16,
                    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                ),
            )
            _EXECUTOR = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deltastore-dq-mask")
        return _EXECUTOR


def payload_shapes(
    out: int, inn: int, params: DQParams
) -> tuple[tuple[int, int], tuple[int, int], tuple[int]]:
    """Shapes of one tensor's mask words (int32), packed column-order codes (uint8) and steps (f32)."""
    kept = params.kept_per_row(inn)
    return (out, words_per_row(inn)), (out, (kept * params.bits + 7) // 8), (out,)


def payload_bytes(out: int, inn: int, params: DQParams) -> int:
    """Device bytes one resident DeltaDQ tensor takes: out·(4·ceil(in/32) + ceil(K·bits/8) + 4)."""
    (o, w), (_, c), _ = payload_shapes(out, inn, params)
    return o * (4 * w + c + 4)


_BYTE_BITS: dict[torch.device, torch.Tensor] = {}


def _byte_bits(device: torch.device) -> torch.Tensor:
    """[256, 8] uint8: bit j of byte b."""
    lut = _BYTE_BITS.get(device)
    if lut is None:
        b = torch.arange(256, dtype=torch.int32)
        lut = _BYTE_BITS[device] = (
            ((b.unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1).to(torch.uint8).to(device)
        )
    return lut


def unpack_mask(words: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 words [..., W] -> bool [..., in_features] (bit j of word w = column 32w + j)."""
    by = words.contiguous().view(torch.uint8)
    bits = torch.nn.functional.embedding(by.to(torch.int32), _byte_bits(words.device))  # one look-up per byte
    return bits.reshape(*words.shape[:-1], -1)[..., :in_features].bool()


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 [..., ceil(count·bits/8)] holding `bits`-bit codes LSB-first -> int32 [..., count]."""
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: no code straddles a byte
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*packed.shape[:-1], -1)[..., :count].to(torch.int32)
    pos = torch.arange(count, dtype=torch.int64, device=packed.device) * bits
    q = torch.zeros(*packed.shape[:-1], count, dtype=torch.int32, device=packed.device)
    for i in range(bits):  # a code may straddle two bytes (bits 3, 5, 6, 7)
        p = pos + i
        byte = packed.index_select(-1, p >> 3).to(torch.int32)
        q |= ((byte >> (p & 7).to(torch.int32)) & 1) << i
    return q


@dataclass(frozen=True)
class DQWeight:
    """One resident DeltaDQ tensor `[out, in]` whose rows each keep `kept` survivors.

    mask:  int32 [out, ceil(in/32)]; bit j of word w is set where column 32w + j survives (the
           word layout of sign planes);
    codes: uint8 [out, ceil(kept·bits/8)]; each row's survivor codes in column order, packed
           LSB-first at `bits` bits each (the file stores them in draw order, split into parts);
    step:  f32 [out]; Δ̂[o, c] = step[o] · (q − (2^bits − 1)/2) where c survives, else 0.
    """

    mask: torch.Tensor
    codes: torch.Tensor
    step: torch.Tensor
    bits: int
    kept: int
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.mask.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mask, self.codes, self.step))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.mask, self.codes, self.step

    def replace(self, mask: torch.Tensor, codes: torch.Tensor, step: torch.Tensor) -> DQWeight:
        return DQWeight(mask, codes, step, self.bits, self.kept, self.in_features)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DQWeight:
        """A copy on `device` (allocated there, then copied: on a side stream the copy is async)."""
        copies = []
        for t in self.tensors():
            d = torch.empty(t.shape, dtype=t.dtype, device=device)
            d.copy_(t, non_blocking=non_blocking)
            copies.append(d)
        return self.replace(*copies)

    def decode(
        self, rows: slice | torch.Tensor | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Δ̂ of rows `rows` (a slice or an index tensor; default all) as `dtype`, on this weight's
        device. In fp32 it is bit-identical to `codec.deltadq.decode`: the same f32 product
        step·(q − centre) lands on the same positions, and every other entry is +0.0."""
        mask, codes, step = (
            self.tensors() if rows is None else (self.mask[rows], self.codes[rows], self.step[rows])
        )
        keep = unpack_mask(mask, self.in_features)
        q = unpack_codes(codes, self.bits, self.kept)
        values = step.to(torch.float32).unsqueeze(-1) * (q.to(torch.float32) - (2**self.bits - 1) / 2)
        out = torch.zeros(keep.shape, dtype=dtype, device=mask.device)
        # Row-major order: row r's survivors take values[r] left to right, i.e. in column order.
        return out.masked_scatter_(keep, values.to(dtype))


@dataclass(frozen=True)
class DQSource:
    """A DeltaDQ tensor of a validated delta file, read and mask-decoded only when staged."""

    delta: DeltaFile
    name: str
    shape: tuple[int, int]

    @property
    def params(self) -> DQParams:
        return self.delta.dq_params(self.name)

    def payload_shapes(self):
        return payload_shapes(*self.shape, self.params)

    @property
    def nbytes(self) -> int:
        return payload_bytes(*self.shape, self.params)

    def empty(self, pin: bool = False) -> DQWeight:
        (mshape, cshape, sshape), p = self.payload_shapes(), self.params
        return DQWeight(
            torch.empty(mshape, dtype=torch.int32, pin_memory=pin),
            torch.empty(cshape, dtype=torch.uint8, pin_memory=pin),
            torch.empty(sshape, dtype=torch.float32, pin_memory=pin),
            p.bits,
            p.kept_per_row(self.shape[1]),
            self.shape[1],
        )

    def build(self) -> DQWeight:
        """The host (CPU) `DQWeight` of this tensor."""
        w = self.empty()
        self.fill(w)
        return w

    def fill(self, into: DQWeight) -> None:
        """Decode the mask positions (the codec's splitmix64 draw, on the host, row blocks spread
        over threads) and write mask words, column-ordered codes and steps into `into`."""
        out = self.shape[0]
        parts = self.delta.dq_codes(self.name).numpy()  # [parts, out, packed], survivors in draw order
        blocks = [(r0, min(out, r0 + _ROW_CHUNK)) for r0 in range(0, out, _ROW_CHUNK)]
        if len(blocks) == 1:
            self._fill_rows(into, parts, *blocks[0])
        else:
            for f in [_executor().submit(self._fill_rows, into, parts, r0, r1) for r0, r1 in blocks]:
                f.result()
        into.step.copy_(self.delta.dq_step(self.name))

    def _fill_rows(self, into: DQWeight, parts: np.ndarray, r0: int, r1: int) -> None:
        out, inn = self.shape
        p = self.params
        kept, g, n = p.kept_per_row(inn), p.group_size, r1 - r0
        full = inn // g
        full_pos, last_pos = codec_dq.kept_positions(
            self.delta.dq_seed, self.name, (out, inn), p, slice(r0, r1)
        )
        cols = ((np.arange(full, dtype=np.int64) * g)[None, :, None] + full_pos).reshape(n, -1)
        if last_pos is not None:
            cols = np.concatenate([cols, full * g + last_pos.astype(np.int64)], axis=1)
        q = np.zeros((n, kept), dtype=np.uint8)
        for j in range(p.parts):
            q |= codec_dq.unpack_codes(parts[j, r0:r1], p.part_bits, kept) << np.uint8(j * p.part_bits)
        mask_bytes = into.mask.numpy().view(np.uint8)[r0:r1]  # [n, 4·W], little-endian words
        keep = np.zeros((n, mask_bytes.shape[1] * 8), dtype=bool)
        np.put_along_axis(keep, cols, True, axis=1)
        mask_bytes[:] = np.packbits(keep, axis=1, bitorder="little")
        # Column order: a survivor's rank in its row is the number of survivors left of it.
        rank = np.take_along_axis(np.cumsum(keep, axis=1, dtype=np.int32), cols, axis=1) - 1
        ordered = np.empty_like(q)
        np.put_along_axis(ordered, rank, q, axis=1)
        into.codes.numpy()[r0:r1] = codec_dq.pack_codes(ordered, p.bits)
