"""Per-forward slot metadata: which delta slot each batch row uses, and the tokens of the batch
grouped by slot into tiles (SGMV segments) so every distinct delta's bits are read once per step.

A `SlotBatch` is built once per forward on the host and installed in a context variable that
the patched modules read; it is shared by every layer of that forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .deltadq import DQWeight

_ACTIVE: ContextVar[SlotBatch | None] = ContextVar("deltastore_slot_batch", default=None)


@dataclass(frozen=True)
class Segments:
    """The `n_tokens` tokens of a forward, those with a delta sorted by slot (stable) and cut into
    tiles of at most `block_m` tokens that all share one slot.

    `perm[tile_start[t] : tile_start[t] + tile_len[t]]` are the token indices of tile `t`, whose
    slot is `tile_slot[t]`; tokens of rows with slot -1 appear in no tile.
    """

    n_tokens: int
    block_m: int
    token_slots: torch.Tensor  # int64 [n_tokens], -1 = base only
    perm: torch.Tensor  # int32 [tokens with a delta]
    tile_slot: torch.Tensor  # int32 [n_tiles]
    tile_start: torch.Tensor  # int32 [n_tiles]
    tile_len: torch.Tensor  # int32 [n_tiles]
    slot_tokens: Mapping[int, torch.Tensor]  # slot -> int64 token indices (for the torch path)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_tiles(self) -> int:
        return int(self.tile_slot.shape[0])

    def memo(self, key, build):
        """`build()`, computed once per key for this forward: what a path derives from the segments
        (the CPU kernel's group table) is then shared by every layer."""
        value = self._memo.get(key)
        if value is None:
            value = self._memo[key] = build()
        return value


def choose_block_m(max_segment_tokens: int) -> int:
    """Tile height: 16 covers decode (a few tokens per delta); prefill uses taller tiles."""
    for m in (16, 32):
        if max_segment_tokens <= m:
            return m
    return 64


def build_segments(
    row_slots: Sequence[int], tokens_per_row: int, device: torch.device, block_m: int | None = None
) -> Segments:
    """Group the tokens of a `[rows, tokens_per_row]` batch by the slot of their row."""
    rows = np.asarray(row_slots, dtype=np.int64).reshape(-1)
    token_slots = np.repeat(rows, tokens_per_row)
    order = np.argsort(token_slots, kind="stable")
    perm = order[token_slots[order] >= 0]
    slots, starts, counts = np.unique(token_slots[perm], return_index=True, return_counts=True)
    if block_m is None:
        block_m = choose_block_m(int(counts.max()) if counts.size else 1)
    tile_slot, tile_start, tile_len = [], [], []
    for slot, start, count in zip(slots.tolist(), starts.tolist(), counts.tolist(), strict=True):
        for off in range(0, count, block_m):
            tile_slot.append(slot)
            tile_start.append(start + off)
            tile_len.append(min(block_m, count - off))
    n_tok, n_perm, n_tiles = token_slots.size, perm.size, len(tile_slot)
    # One host->device copy for the whole table.
    packed = np.concatenate(
        [token_slots, perm, np.asarray(tile_slot + tile_start + tile_len, dtype=np.int64)]
    )
    dev = torch.from_numpy(packed).to(device)
    token_slots_t = dev[:n_tok]
    perm64 = dev[n_tok : n_tok + n_perm]
    small = dev[n_tok:].to(torch.int32)
    perm32 = small[:n_perm]
    tiles = small[n_perm:]
    slot_tokens = {
        int(s): perm64[int(st) : int(st) + int(c)]
        for s, st, c in zip(slots.tolist(), starts.tolist(), counts.tolist(), strict=True)
    }
    return Segments(
        n_tokens=n_tok,
        block_m=block_m,
        token_slots=token_slots_t,
        perm=perm32,
        tile_slot=tiles[:n_tiles],
        tile_start=tiles[n_tiles : 2 * n_tiles],
        tile_len=tiles[2 * n_tiles :],
        slot_tokens=slot_tokens,
    )


@dataclass(frozen=True)
class SlotView:
    """What a leased slot holds, frozen for the duration of one forward."""

    index: int
    sign: frozenset[str]  # tensors with a sign delta
    tables: frozenset[str]  # small dense tensors this delta replaces (norm weights, biases)
    dense: Mapping[str, torch.Tensor]  # large dense replacements (embeddings, lm_head), on device
    planes: int = 1  # bit-planes of this delta (pool planes beyond it hold zeros)
    dq: Mapping[str, DQWeight] = field(default_factory=dict)  # DeltaDQ tensors, on device
    # low-rank factors (a [rank, in], b [out, rank]): views of the pool's factor space
    lowrank: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class SlotBatch:
    """Row -> slot assignment of one forward (rows are the leading dim of every activation)."""

    row_slots: tuple[int, ...]
    device: torch.device
    views: Mapping[int, SlotView]
    _segments: dict[int, Segments] = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> int:
        return len(self.row_slots)

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(sorted(self.views))

    def segments(self, tokens_per_row: int) -> Segments:
        seg = self._segments.get(tokens_per_row)
        if seg is None:
            seg = self._segments[tokens_per_row] = build_segments(self.row_slots, tokens_per_row, self.device)
        return seg

    def with_sign(self, name: str) -> list[int]:
        return [s for s, v in sorted(self.views.items()) if name in v.sign]

    def with_table(self, name: str) -> list[int]:
        return [s for s, v in sorted(self.views.items()) if name in v.tables]

    def with_dense(self, name: str) -> list[int]:
        return [s for s, v in sorted(self.views.items()) if name in v.dense]

    def with_dq(self, name: str) -> list[int]:
        return [s for s, v in sorted(self.views.items()) if name in v.dq]

    def with_lowrank(self, name: str) -> list[int]:
        return [s for s, v in sorted(self.views.items()) if name in v.lowrank]


def active_batch() -> SlotBatch | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def use_batch(batch: SlotBatch | None) -> Iterator[None]:
    token = _ACTIVE.set(batch)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
