"""Slot layout and budget arithmetic: what one slot costs, and how a budget becomes slots with
and without sign space (and the room left beside them)."""

from __future__ import annotations

import pytest
import torch

from gpu_loader import BudgetError, PoolLayout
from gpu_loader.pool_layout import slot_counts

LAYOUT = PoolLayout(
    sign={"a.weight": (10, 33), "b.weight": (4, 64)},
    table={"n.weight": ((33,), torch.float16), "a.bias": ((10,), torch.float32)},
    dense={"a.weight": ((10, 33), torch.float32)},
    planes=2,
)


def test_slot_bytes_are_words_scales_tables_and_flags():
    # words: ceil(33/32) = 2 int32 per row; scales: one f32 per row and plane
    assert LAYOUT.sign_bytes("a.weight") == 2 * 10 * (2 * 4 + 4)
    assert LAYOUT.sign_bytes("b.weight") == 2 * 4 * (2 * 4 + 4)
    assert LAYOUT.table_slot_bytes == 4 * 2 + 33 * 2 + 10 * 4  # one active flag per sign tensor
    assert (
        LAYOUT.slot_bytes
        == LAYOUT.sign_bytes("a.weight") + LAYOUT.sign_bytes("b.weight") + LAYOUT.table_slot_bytes
    )


def test_base_specs_describe_every_tensor_of_the_layout():
    specs = LAYOUT.base_specs()
    assert specs["b.weight"] == ("F16", (4, 64))
    assert specs["a.weight"] == ("F32", (10, 33)) and specs["n.weight"] == ("F16", (33,))


def test_planes_must_be_positive():
    with pytest.raises(ValueError, match="planes must be >= 1"):
        PoolLayout(sign={}, table={}, dense={}, planes=0)


def test_budget_gives_whole_slots_up_to_max_slots():
    one = LAYOUT.slot_bytes
    counts = slot_counts(LAYOUT, int(2.5 * one), max_slots=8, sign_slots=None)
    assert (counts.slots, counts.sign_slots, counts.fixed_bytes) == (2, 2, 2 * one)
    assert counts.room_bytes == int(2.5 * one) - 2 * one
    assert slot_counts(LAYOUT, 100 * one, max_slots=3, sign_slots=None).slots == 3
    with pytest.raises(BudgetError, match="holds no delta slot"):
        slot_counts(LAYOUT, one - 1, max_slots=8, sign_slots=None)


def test_table_only_slots_cost_only_their_tables():
    counts = slot_counts(LAYOUT, 10**6, max_slots=5, sign_slots=2)
    assert (counts.slots, counts.sign_slots) == (5, 2)
    assert counts.fixed_bytes == 2 * LAYOUT.slot_bytes + 3 * LAYOUT.table_slot_bytes
    need = counts.fixed_bytes
    with pytest.raises(BudgetError, match=r"does not hold 2 slot\(s\) with sign space"):
        slot_counts(LAYOUT, need - 1, max_slots=5, sign_slots=2)


@pytest.mark.parametrize(
    "max_slots,sign_slots,match",
    [
        (0, None, "max_slots must be >= 1"),
        (2, 3, "sign_slots must be between 0 and max_slots"),
        (2, -1, "sign_slots must be between 0 and max_slots"),
    ],
)
def test_bad_slot_numbers_are_refused(max_slots, sign_slots, match):
    with pytest.raises(BudgetError, match=match):
        slot_counts(LAYOUT, 10**9, max_slots=max_slots, sign_slots=sign_slots)
