"""The Triton SGMV kernel against the torch reference (interpreted on CPU), and its launcher's
argument checks."""

from __future__ import annotations

import pytest
import torch

from gpu_loader.segments import build_segments
from gpu_loader.sgmv import sgmv_sign, sgmv_sign_triton, triton_available
from gpu_loader.sgmv_reference import sgmv_sign_reference
from tests.support.sign_slots import assert_close, make_slots


def kernel_device() -> torch.device:
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if not triton_available(dev):
        pytest.skip("the Triton kernel needs CUDA or TRITON_INTERPRET=1")
    return dev


SHAPES = [(1, 1), (31, 33), (33, 31), (4097, 33), (33, 4097)]  # (in, out)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("inn,out", SHAPES, ids=[f"in{i}-out{o}" for i, o in SHAPES])
def test_kernel_matches_reference(inn, out, batch, dtype):
    dev = kernel_device()
    per_row = (inn + out + batch) % 2 == 0  # both scale modes across the matrix
    words, scales, _, _ = make_slots(3, out, inn, planes=2, per_row=per_row, seed=inn * 31 + out)
    if not per_row:
        scales = scales.expand(-1, -1, out).contiguous()  # the pool stores [S, P, out]
    gen = torch.Generator().manual_seed(batch)
    rows = [[0, -1, 2][i % 3] if batch > 1 else 1 for i in range(batch)]
    x = torch.randn(batch, inn, generator=gen).to(dtype)
    y0 = torch.randn(batch, out, generator=gen).to(dtype)
    words, scales, x, y0 = (t.to(dev) for t in (words, scales, x, y0))
    seg = build_segments(rows, 1, dev)
    active = torch.ones(3, dtype=torch.int32, device=dev)
    got = sgmv_sign_triton(x, y0.clone(), words, scales, active, seg)
    ref = sgmv_sign_reference(x, y0.clone(), words, scales, seg)
    assert_close(got, ref)
    base_rows = [i for i, r in enumerate(rows) if r < 0]
    assert torch.equal(got[base_rows], y0[base_rows])  # rows without a delta are untouched


@pytest.mark.triton
def test_kernel_reads_per_matrix_scales_with_stride_zero():
    dev = kernel_device()
    words, scales, _, _ = make_slots(2, 40, 70, planes=1, per_row=False)
    assert scales.shape == (2, 1, 1)
    x = torch.randn(4, 70).to(dev)
    y0 = torch.randn(4, 40).to(dev)
    seg = build_segments([1, 0, -1, 1], 1, dev)
    active = torch.ones(2, dtype=torch.int32, device=dev)
    got = sgmv_sign_triton(x, y0.clone(), words.to(dev), scales.to(dev), active, seg)
    ref = sgmv_sign_reference(x, y0.clone(), words.to(dev), scales.expand(-1, -1, 40).to(dev), seg)
    assert_close(got, ref)


@pytest.mark.triton
def test_kernel_prefill_segments_longer_than_a_tile():
    dev = kernel_device()
    words, scales, _, _ = make_slots(2, 48, 64, planes=1, per_row=True)
    rows = [1, -1, 0]
    x = torch.randn(3 * 40, 64).to(torch.float16).to(dev)
    y0 = torch.randn(3 * 40, 48).to(torch.float16).to(dev)
    seg = build_segments(rows, 40, dev)
    assert seg.n_tiles == 2 and seg.block_m == 64
    active = torch.ones(2, dtype=torch.int32, device=dev)
    got = sgmv_sign_triton(x, y0.clone(), words.to(dev), scales.to(dev), active, seg)
    assert_close(got, sgmv_sign_reference(x, y0.clone(), words.to(dev), scales.to(dev), seg))


@pytest.mark.triton
def test_kernel_skips_slots_without_a_delta_for_the_layer():
    dev = kernel_device()
    words, scales, _, _ = make_slots(2, 20, 33, planes=1, per_row=True)
    x, y0 = torch.randn(2, 33).to(dev), torch.randn(2, 20).to(dev)
    seg = build_segments([0, 1], 1, dev)
    active = torch.tensor([1, 0], dtype=torch.int32, device=dev)
    got = sgmv_sign_triton(x, y0.clone(), words.to(dev), scales.to(dev), active, seg)
    assert torch.equal(got[1], y0[1])
    ref = sgmv_sign_reference(x, y0.clone(), words.to(dev), scales.to(dev), seg, slots=[0])
    assert_close(got, ref)


@pytest.mark.triton
@pytest.mark.parametrize("inn,out", [(33, 31), (300, 129)])
def test_kernel_bf16_activations(inn, out):
    dev = kernel_device()
    words, scales, _, _ = make_slots(2, out, inn, planes=2, per_row=True)
    x = torch.randn(5, inn).to(torch.bfloat16).to(dev)
    y0 = torch.randn(5, out).to(torch.bfloat16).to(dev)
    seg = build_segments([1, 0, -1, 1, 0], 1, dev)
    active = torch.ones(2, dtype=torch.int32, device=dev)
    got = sgmv_sign_triton(x, y0.clone(), words.to(dev), scales.to(dev), active, seg)
    assert_close(got, sgmv_sign_reference(x, y0.clone(), words.to(dev), scales.to(dev), seg))


def test_launcher_rejects_mismatched_shapes_and_dtypes():
    words, scales, _, _ = make_slots(2, 8, 40, planes=1, per_row=True)
    seg = build_segments([0], 1, torch.device("cpu"))
    active = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="words must be int32"):
        sgmv_sign_triton(torch.randn(1, 70), torch.randn(1, 8), words, scales, active, seg)
    with pytest.raises(TypeError, match="activation dtype"):
        sgmv_sign_triton(torch.randn(1, 40), torch.randn(1, 8).half(), words, scales, active, seg)
    with pytest.raises(ValueError, match="scales must be float32"):
        sgmv_sign_triton(torch.randn(1, 40), torch.randn(1, 8), words, scales[:, :, :3], active, seg)
    with pytest.raises(ValueError, match="unknown backend"):
        sgmv_sign(torch.randn(1, 40), torch.randn(1, 8), words, scales, active, seg, backend="cuda")
