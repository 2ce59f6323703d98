"""What one delta slot holds and what it costs: the pool's per-slot layout (sign space, small
tables, dense room) and the budget arithmetic that turns a memory budget into a number of slots.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from codec.checkpoint import TORCH_TO_ST

from .errors import BudgetError
from .layout import words_per_row
from .sizes import format_size


@dataclass(frozen=True)
class PoolLayout:
    """What every slot holds, by base tensor name.

    sign:  2-D float weights that may carry a sign delta -> (out, in); per slot int32 words
           [planes, out, ceil(in/32)] and f32 scales [planes, out].
    table: small tensors copied per slot (norm weights, biases) -> (shape, dtype).
    dense: 2-D weights whose `.full` replacement (kept-dense embeddings, lm_head) is allocated
           on demand from the budget left over by the fixed slots -> (shape, dtype).
    max_rank: with `max_rank` R > 0 every slot (with sign space or not) also holds low-rank factor
           space for each `sign` tensor: a [R, in] and b [out, R] in `factor_dtype`, and its rank
           (int32); a delta of rank r < R leaves the rest unused.
    """

    sign: Mapping[str, tuple[int, int]]
    table: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
    dense: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
    planes: int = 1
    max_rank: int = 0
    factor_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.planes < 1:
            raise ValueError("planes must be >= 1")
        if self.max_rank < 0:
            raise ValueError("max_rank must be >= 0")

    def sign_bytes(self, name: str) -> int:
        out, inn = self.sign[name]
        return self.planes * out * (words_per_row(inn) * 4 + 4)

    def factor_bytes(self, name: str) -> int:
        """Low-rank factor space of one tensor in one slot: R·(in + out) factor values and its rank."""
        if not self.max_rank:
            return 0
        out, inn = self.sign[name]
        return self.max_rank * (inn + out) * dtype_itemsize(self.factor_dtype) + 4

    @property
    def slot_bytes(self) -> int:
        """Device bytes of one slot's fixed part (words, scales, tables, active flags)."""
        return sum(self.sign_bytes(n) for n in self.sign) + self.table_slot_bytes

    @property
    def table_slot_bytes(self) -> int:
        """Device bytes of a table-only slot (tables, active flags and low-rank factor space, no
        sign space): what a slot holding a DeltaDQ or low-rank delta needs beside its payload."""
        total = 4 * len(self.sign) + sum(self.factor_bytes(n) for n in self.sign)
        for shape, dtype in self.table.values():
            total += shape_numel(shape) * dtype_itemsize(dtype)
        return total

    def base_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """(safetensors dtype, shape) per name, for layouts built without a model (benchmarks)."""
        specs = {n: ("F16", (o, i)) for n, (o, i) in self.sign.items()}
        specs.update({n: (TORCH_TO_ST[d], tuple(s)) for n, (s, d) in {**self.dense, **self.table}.items()})
        return specs


def shape_numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def dtype_itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class SlotCounts:
    """How a budget is divided: `slots` slots, of which the first `sign_slots` reserve sign space;
    `fixed_bytes` is their fixed part, `room_bytes` what is left for dense tensors and DeltaDQ payloads."""

    slots: int
    sign_slots: int
    fixed_bytes: int
    room_bytes: int


def slot_counts(layout: PoolLayout, budget: int, max_slots: int, sign_slots: int | None) -> SlotCounts:
    """By default every slot reserves sign space and there are `min(max_slots, budget // slot_bytes)`
    slots; with `sign_slots=s` there are exactly `max_slots` slots, the first `s` with sign space and
    the others table-only. Raises BudgetError when the budget holds none (or not the ones asked for)."""
    if max_slots < 1:
        raise BudgetError(f"max_slots must be >= 1, got {max_slots}")
    if sign_slots is not None and not 0 <= sign_slots <= max_slots:
        raise BudgetError(f"sign_slots must be between 0 and max_slots ({max_slots}), got {sign_slots}")
    slot_bytes, table_bytes = layout.slot_bytes, layout.table_slot_bytes
    if sign_slots is None:
        n = n_sign = min(max_slots, budget // max(slot_bytes, 1))
        if n < 1:
            raise BudgetError(
                f"memory budget {format_size(budget)} holds no delta slot: one slot needs "
                f"{format_size(slot_bytes)} ({layout.planes} plane(s)"
                + (f", low-rank factors up to rank {layout.max_rank}" if layout.max_rank else "")
                + "); raise memory_budget"
                + (" or lower max_rank" if layout.max_rank else "")
            )
    else:
        n, n_sign = max_slots, sign_slots
        fixed = n_sign * slot_bytes + (n - n_sign) * table_bytes
        if fixed > budget:
            raise BudgetError(
                f"memory budget {format_size(budget)} does not hold {n_sign} slot(s) with sign space "
                f"({format_size(slot_bytes)} each) and {n - n_sign} table-only slot(s) "
                f"({format_size(table_bytes)} each): {format_size(fixed)} needed; raise memory_budget "
                "or lower sign_slots / max_slots"
            )
    fixed = n_sign * slot_bytes + (n - n_sign) * table_bytes
    return SlotCounts(slots=n, sign_slots=n_sign, fixed_bytes=fixed, room_bytes=budget - fixed)
