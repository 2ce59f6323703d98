"""Host staging: a delta's tensors land in one aligned host buffer in slot layout (file sign bytes
as little-endian words with zero padding, scales per row and plane, unused planes zero)."""

from __future__ import annotations

import torch

from codec.bitdelta import binarize
from gpu_loader import PoolLayout
from gpu_loader.layout import pack_words
from gpu_loader.staging import _ALIGN, stage_tensors

LAYOUT = PoolLayout(
    sign={"w": (5, 41), "v": (3, 8)},
    table={"n": ((41,), torch.float32)},
    dense={"e": ((7, 41), torch.float32)},
    planes=3,
)


def test_signs_become_padded_words_and_scales_fill_every_row():
    gen = torch.Generator().manual_seed(0)
    sign, scale = binarize(torch.randn(5, 41, generator=gen), None, planes=2, scale_mode="per-matrix")
    staged = stage_tensors(LAYOUT, "k", sign={"w": sign}, scale={"w": scale}, info={"x": 1})
    words, scales = staged.words["w"], staged.scales["w"]
    assert words.dtype == torch.int32 and words.shape == (3, 5, 2)
    assert torch.equal(words[:2], pack_words(sign))
    assert not words[2].any() and not scales[2].any()  # the pool's third plane: nothing
    assert torch.equal(scales[:2], scale.expand(2, 5))
    assert staged.key == "k" and staged.info == {"x": 1} and staged.room_bytes == 0


def test_tables_and_dense_tensors_are_copied_and_views_are_aligned():
    gen = torch.Generator().manual_seed(1)
    full = {"n": torch.randn(41, generator=gen), "e": torch.randn(7, 41, generator=gen)}
    sign, scale = binarize(torch.randn(3, 8, generator=gen), None, planes=1, scale_mode="per-row")
    staged = stage_tensors(LAYOUT, "k", sign={"v": sign}, scale={"v": scale}, full=full)
    assert torch.equal(staged.tables["n"], full["n"]) and torch.equal(staged.dense["e"], full["e"])
    assert staged.dense_bytes == 7 * 41 * 4 and staged.room_bytes == staged.dense_bytes
    base = staged._arena.data_ptr()
    for t in (staged.words["v"], staged.scales["v"], staged.tables["n"], staged.dense["e"]):
        assert (t.data_ptr() - base) % _ALIGN == 0
        assert t.untyped_storage().data_ptr() == staged._arena.untyped_storage().data_ptr()  # one buffer
    assert staged.nbytes == staged._arena.numel()
