"""The low-rank shrink/expand kernel pair against the torch path (interpreted on CPU), the torch
path against a dense Δ̂ = b·a per row, and the launcher's argument checks."""

from __future__ import annotations

import pytest
import torch

from gpu_loader.segments import build_segments
from gpu_loader.sgmv_lowrank import rank_block, sgmv_lowrank, sgmv_lowrank_triton
from gpu_loader.sgmv_reference import sgmv_lowrank_reference
from tests.gpu_loader.test_sgmv import kernel_device
from tests.support.sign_slots import assert_close


def make_factors(n_slots: int, out: int, inn: int, ranks: list[int], max_rank: int, dtype, seed: int = 0):
    """Pool-shaped factors a [S, R, in], b [S, out, R] of the given per-slot ranks, zero beyond
    each rank and with garbage (NaN) past it in one slot to prove the masks hold."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.zeros(n_slots, max_rank, inn)
    b = torch.zeros(n_slots, out, max_rank)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, inn, generator=gen) / inn**0.5
        b[s, :, :r] = torch.randn(out, r, generator=gen) * 0.1
    if max_rank > max(ranks):
        a[0, max(ranks) :] = float("nan")
        b[0, :, max(ranks) :] = float("nan")
    return a.to(dtype), b.to(dtype), torch.tensor(ranks, dtype=torch.int32)


SHAPES = [(1, 1), (31, 33), (33, 31), (4097, 33), (33, 4097)]  # (in, out)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("inn,out", SHAPES, ids=[f"in{i}-out{o}" for i, o in SHAPES])
def test_kernels_match_the_torch_path(inn, out, batch, dtype):
    dev = kernel_device()
    ranks = [3, 0, 16] if (inn + batch) % 2 else [1, 0, 7]  # slot 1 has no low-rank term here
    a, b, rk = make_factors(3, out, inn, ranks, max_rank=20, dtype=dtype, seed=inn + out)
    gen = torch.Generator().manual_seed(batch)
    rows = [[0, -1, 2, 1][i % 4] if batch > 1 else 2 for i in range(batch)]
    x = torch.randn(batch, inn, generator=gen).to(dtype)
    y0 = torch.randn(batch, out, generator=gen).to(dtype)
    a, b, rk, x, y0 = (t.to(dev) for t in (a, b, rk, x, y0))
    seg = build_segments(rows, 1, dev)
    got = sgmv_lowrank_triton(x, y0.clone(), a, b, rk, seg)
    ref = sgmv_lowrank_reference(x, y0.clone(), a, b, rk, seg)
    assert_close(got, ref)
    untouched = [i for i, r in enumerate(rows) if r in (-1, 1)]  # base rows, and a slot of rank 0
    assert torch.equal(got[untouched], y0[untouched])


@pytest.mark.triton
@pytest.mark.parametrize("rank", [1, 16, 17, 64])
def test_kernels_prefill_segments_longer_than_a_tile(rank):
    dev = kernel_device()
    a, b, rk = make_factors(2, 48, 70, [rank, rank // 2 + 1], max_rank=64, dtype=torch.float16)
    x = torch.randn(3 * 40, 70).half()
    y0 = torch.randn(3 * 40, 48).half()
    seg = build_segments([1, -1, 0], 40, dev)
    assert seg.n_tiles == 2 and seg.block_m == 64
    got = sgmv_lowrank_triton(x.to(dev), y0.clone().to(dev), a.to(dev), b.to(dev), rk.to(dev), seg)
    assert_close(
        got, sgmv_lowrank_reference(x, y0.clone(), a, b, rk, build_segments([1, -1, 0], 40, x.device))
    )


@pytest.mark.triton
@pytest.mark.parametrize("split_k", [2, 3])
def test_shrink_split_over_the_input_axis_adds_its_partial_sums(split_k):
    """The GPU default splits shrink's input axis (atomic adds into a zeroed buffer)."""
    dev = kernel_device()
    a, b, rk = make_factors(3, 40, 1100, [4, 13, 0], max_rank=16, dtype=torch.float32, seed=split_k)
    x, y0 = torch.randn(5, 1100), torch.randn(5, 40)
    rows = [1, 0, -1, 2, 1]
    got = sgmv_lowrank_triton(
        x.to(dev),
        y0.clone().to(dev),
        a.to(dev),
        b.to(dev),
        rk.to(dev),
        build_segments(rows, 1, dev),
        split_k=split_k,
    )
    assert_close(got.cpu(), sgmv_lowrank_reference(x, y0.clone(), a, b, rk, build_segments(rows, 1, "cpu")))


@pytest.mark.triton
def test_kernels_read_bf16_and_ranks_from_a_strided_column():
    dev = kernel_device()
    a, b, rk = make_factors(2, 24, 40, [5, 9], max_rank=16, dtype=torch.bfloat16)
    table = torch.zeros(2, 3, dtype=torch.int32)  # the pool's [slots, tensors] rank table
    table[:, 1] = rk
    x = torch.randn(4, 40).bfloat16()
    y0 = torch.randn(4, 24).bfloat16()
    seg = build_segments([1, 0, -1, 1], 1, dev)
    got = sgmv_lowrank_triton(x.to(dev), y0.clone().to(dev), a.to(dev), b.to(dev), table[:, 1].to(dev), seg)
    assert_close(
        got, sgmv_lowrank_reference(x, y0.clone(), a, b, rk, build_segments([1, 0, -1, 1], 1, "cpu"))
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_torch_path_is_the_dense_product_per_row(dtype):
    a, b, rk = make_factors(3, 19, 23, [4, 2, 0], max_rank=8, dtype=dtype, seed=5)
    rows = [2, 0, -1, 1, 0]
    x = torch.randn(len(rows), 23).to(dtype)
    y0 = torch.randn(len(rows), 19).to(dtype)
    got = sgmv_lowrank(x, y0.clone(), a, b, rk, build_segments(rows, 1, x.device), backend="torch")
    for i, s in enumerate(rows):
        r = int(rk[s]) if s >= 0 else 0
        dense = b[s, :, :r].float() @ a[s, :r].float() if r else torch.zeros(19, 23)
        expected = (y0[i].float() + x[i].float() @ dense.T).to(dtype)
        assert_close(got[i : i + 1], expected[None])
        if r == 0:
            assert torch.equal(got[i], y0[i])


def test_rank_block_is_a_power_of_two_of_at_least_16():
    assert [rank_block(r) for r in (0, 1, 16, 17, 64, 65)] == [16, 16, 16, 32, 64, 128]


def test_launcher_names_what_is_wrong():
    a, b, rk = make_factors(2, 8, 12, [2, 3], max_rank=4, dtype=torch.float32)
    x, y = torch.randn(3, 12), torch.randn(3, 8)
    seg = build_segments([0, 1, -1], 1, x.device)
    with pytest.raises(ValueError, match=r"factors must be a \[S, R, 12\] and b \[S, 8, R\]"):
        sgmv_lowrank_triton(x, y, a[:, :, :10], b, rk, seg)
    with pytest.raises(ValueError, match=r"b must be \[S, 7, R\] for y \(3, 7\), got \[2, 8, 4\]"):
        sgmv_lowrank_triton(x, y[:, :7], a, b, rk, seg)
    with pytest.raises(TypeError, match="factors must share a float dtype"):
        sgmv_lowrank_triton(x, y, a, b.half(), rk, seg)
    with pytest.raises(ValueError, match=r"ranks must be int32 \[>= 2\]"):
        sgmv_lowrank_triton(x, y, a, b, rk.long(), seg)
    with pytest.raises(TypeError, match="share an activation dtype"):
        sgmv_lowrank_triton(x, y.half(), a, b, rk, seg)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        sgmv_lowrank(x, y, a, b, rk, seg, backend="cuda")
