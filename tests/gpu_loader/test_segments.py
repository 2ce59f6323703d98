"""Per-forward slot metadata: tokens grouped by slot into tiles, base rows left out."""

from __future__ import annotations

import torch

from gpu_loader.segments import build_segments


def test_segments_group_tokens_by_slot_and_leave_out_base_rows():
    rows = [3, -1, 0, 3, 0, -1]
    seg = build_segments(rows, tokens_per_row=2, device=torch.device("cpu"))
    assert seg.token_slots.tolist() == [3, 3, -1, -1, 0, 0, 3, 3, 0, 0, -1, -1]
    assert seg.block_m == 16
    # decode-sized batch: one tile per distinct slot, so each delta's bits are read once
    assert seg.tile_slot.tolist() == [0, 3]
    tiles = [
        seg.perm[s : s + n].tolist()
        for s, n in zip(seg.tile_start.tolist(), seg.tile_len.tolist(), strict=True)
    ]
    assert tiles == [[4, 5, 8, 9], [0, 1, 6, 7]]
    assert {k: v.tolist() for k, v in seg.slot_tokens.items()} == {0: [4, 5, 8, 9], 3: [0, 1, 6, 7]}


def test_segments_cut_long_segments_into_tiles():
    seg = build_segments([1, 1, -1], tokens_per_row=50, device=torch.device("cpu"))
    assert seg.block_m == 64
    assert seg.tile_slot.tolist() == [1, 1]
    assert seg.tile_len.tolist() == [64, 36]
    assert seg.perm.tolist() == list(range(100))
    assert build_segments([-1, -1], 3, torch.device("cpu")).n_tiles == 0


def test_slot_batch_lists_the_slots_that_change_a_tensor_and_is_scoped():
    from gpu_loader.segments import SlotBatch, SlotView, active_batch, use_batch

    views = {
        2: SlotView(2, sign=frozenset({"w"}), tables=frozenset({"b"}), dense={}),
        0: SlotView(0, sign=frozenset(), tables=frozenset(), dense={"w": torch.zeros(1)}),
    }
    batch = SlotBatch((2, -1, 0, 2), torch.device("cpu"), views)
    assert batch.rows == 4 and batch.slots == (0, 2)
    assert batch.with_sign("w") == [2] and batch.with_table("b") == [2] and batch.with_dense("w") == [0]
    assert batch.with_dq("w") == []
    assert batch.segments(3) is batch.segments(3)  # built once per tokens-per-row
    assert batch.segments(3).token_slots.tolist() == [2] * 3 + [-1] * 3 + [0] * 3 + [2] * 3
    assert active_batch() is None
    with use_batch(batch):
        assert active_batch() is batch
        with use_batch(None):
            assert active_batch() is None
        assert active_batch() is batch
    assert active_batch() is None
