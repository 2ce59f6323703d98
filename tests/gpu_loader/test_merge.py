"""Merge mode math: the merged weight is the format's reconstruction, and unmerging restores
the original bits exactly, including where the float round trip alone would not."""

from __future__ import annotations

import pytest
import torch

from codec.bitdelta import binarize, reconstruct
from gpu_loader.merge import merge_sign_, unmerge_sign_

INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("planes,mode", [(1, "per-matrix"), (2, "per-row")])
def test_merge_is_reconstruct_and_unmerge_restores_every_bit(dtype, planes, mode):
    gen = torch.Generator().manual_seed(planes)
    base = (torch.randn(37, 45, generator=gen) * 0.05).to(dtype)
    ft = base.float() + torch.randn(37, 45, generator=gen) * 0.01
    sign, scale = binarize(ft, base, planes=planes, scale_mode=mode)
    weight = base.clone()
    record = merge_sign_(weight, sign, scale)
    assert torch.equal(
        weight.view(INT_VIEW[dtype]), reconstruct(base, sign, scale, dtype).view(INT_VIEW[dtype])
    )
    unmerge_sign_(weight, record)
    assert torch.equal(weight.view(INT_VIEW[dtype]), base.view(INT_VIEW[dtype]))


def test_unmerge_corrects_positions_the_float_round_trip_loses():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 64, generator=gen).half()
    sign, scale = binarize(base.float() + 0.3 * torch.randn(64, 64, generator=gen), base)
    weight = base.clone()
    record = merge_sign_(weight, sign, scale)
    assert record.corrections > 0  # fp16 rounding after adding a large Δ̂ is not invertible everywhere
    unmerge_sign_(weight, record)
    assert torch.equal(weight.view(torch.int16), base.view(torch.int16))


def test_merge_preserves_signed_zeros_and_works_in_row_chunks(monkeypatch):
    import gpu_loader.merge as merge

    monkeypatch.setattr(merge, "_CHUNK_BYTES", 3 * 16 * 4)  # 3 rows per step
    base = torch.zeros(10, 16)
    base[::2] = -0.0
    sign, scale = binarize(torch.randn(10, 16), base, scale_mode="per-row")
    weight = base.clone()
    record = merge_sign_(weight, sign, scale)
    unmerge_sign_(weight, record)
    assert torch.equal(weight.view(torch.int32), base.view(torch.int32))


def test_merge_refuses_integer_weights():
    with pytest.raises(TypeError, match="2-D float weight"):
        merge_sign_(
            torch.zeros(2, 8, dtype=torch.int32), torch.zeros(1, 2, 1, dtype=torch.uint8), torch.ones(1, 1)
        )
