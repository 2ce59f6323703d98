"""The multi-tenant sign-delta matmul: bit layout, the torch reference against the codec's
decoder, segment tables, and the Triton kernel against the reference (interpreted on CPU)."""

from __future__ import annotations

import pytest
import torch

from codec.bitdelta import binarize, decode, pack_signs, reconstruct
from gpu_loader.segments import build_segments
from gpu_loader.sgmv import (
    decode_words, pack_words, reconstruct_words, sgmv_sign, sgmv_sign_reference, sgmv_sign_triton,
    sign_matmul_lut, triton_available, words_per_row,
)

#: Kernel vs reference, per activation dtype: both accumulate in fp32 and round once, so they
#: differ by accumulation order (fp32) or by one rounding step of the output (fp16, bf16).
TOL = {
    torch.float32: dict(rtol=1e-5, atol_rel=1e-5),
    torch.float16: dict(rtol=1e-3, atol_rel=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol_rel=8e-3),
}


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    tol = TOL[ref.dtype]
    scale = ref.float().abs().max().item() + 1.0
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol["rtol"], atol=tol["atol_rel"] * scale)


def kernel_device() -> torch.device:
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if not triton_available(dev):
        pytest.skip("the Triton kernel needs CUDA or TRITON_INTERPRET=1")
    return dev


def make_slots(n_slots: int, out: int, inn: int, planes: int, per_row: bool, seed: int = 0):
    """Packed words [S, P, out, W] and scales [S, P, out|1] of `n_slots` random deltas, and the
    file-format signs/scales they came from."""
    gen = torch.Generator().manual_seed(seed)
    mode = "per-row" if per_row else "per-matrix"
    signs, scales = [], []
    for _ in range(n_slots):
        s, c = binarize(torch.randn(out, inn, generator=gen), None, planes=planes, scale_mode=mode)
        signs.append(s)
        scales.append(c)
    words = torch.stack([pack_words(s) for s in signs])
    return words, torch.stack(scales), signs, scales


def test_pack_words_puts_column_32w_plus_j_at_bit_j_of_word_w():
    gen = torch.Generator().manual_seed(1)
    for n in (1, 8, 31, 32, 33, 70):
        bits = torch.rand(3, n, generator=gen) > 0.5
        words = pack_words(pack_signs(bits))
        assert words.dtype == torch.int32 and words.shape == (3, words_per_row(n))
        cols = torch.arange(n)
        got = (words[:, cols // 32] >> (cols % 32)) & 1
        assert torch.equal(got.bool(), bits)


@pytest.mark.parametrize("per_row", [True, False])
def test_decode_words_is_bit_identical_to_codec_decode(per_row):
    words, scales, signs, file_scales = make_slots(1, 9, 45, planes=2, per_row=per_row)
    assert torch.equal(decode_words(words[0], scales[0], 45), decode(signs[0], file_scales[0], 45))


def test_reference_equals_per_token_dense_oracle():
    out, inn = 13, 37
    words, scales, signs, file_scales = make_slots(3, out, inn, planes=2, per_row=True)
    rows = [2, -1, 0, 2, 1]
    x = torch.randn(len(rows) * 2, inn)
    y0 = torch.randn(len(rows) * 2, out)
    y = sgmv_sign_reference(x, y0.clone(), words, scales, build_segments(rows, 2, x.device))
    for t in range(x.shape[0]):
        slot = rows[t // 2]
        want = y0[t] if slot < 0 else y0[t] + x[t] @ decode(signs[slot], file_scales[slot], inn).T
        torch.testing.assert_close(y[t], want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("planes,mode", [(1, "per-row"), (2, "per-row"), (1, "per-matrix")])
def test_reconstruct_words_is_bit_identical_to_codec_reconstruct(dtype, planes, mode):
    gen = torch.Generator().manual_seed(planes)
    base = torch.randn(12, 45, generator=gen).to(dtype)
    ft = base.float() + 0.05 * torch.randn(12, 45, generator=gen)
    ft[3] = base[3].float()  # an unchanged row: scale 0 on every plane
    base[3, ::2] = -0.0  # where a -0.0 base meets a zero scale, only +0.0 is right
    sign, scale = binarize(ft, base, planes=planes, scale_mode=mode)
    out = torch.empty_like(base)
    reconstruct_words(base, pack_words(sign), scale, out)
    bits = torch.int16 if dtype == torch.float16 else torch.int32
    assert torch.equal(out.view(bits), reconstruct(base, sign, scale, dtype).view(bits))


@pytest.mark.parametrize("inn", [1, 7, 31, 33, 70])
@pytest.mark.parametrize("tokens", [1, 3])
def test_lut_matmul_equals_decoded_matmul(inn, tokens):
    words, scales, signs, file_scales = make_slots(1, 11, inn, planes=2, per_row=inn % 2 == 1, seed=inn)
    x = torch.randn(tokens, inn)
    want = x @ decode(signs[0], file_scales[0], inn).T
    torch.testing.assert_close(sign_matmul_lut(x, words[0], scales[0]), want, rtol=1e-5, atol=1e-5)


def test_segments_group_tokens_by_slot_and_leave_out_base_rows():
    rows = [3, -1, 0, 3, 0, -1]
    seg = build_segments(rows, tokens_per_row=2, device=torch.device("cpu"))
    assert seg.token_slots.tolist() == [3, 3, -1, -1, 0, 0, 3, 3, 0, 0, -1, -1]
    assert seg.block_m == 16
    # decode-sized batch: one tile per distinct slot, so each delta's bits are read once
    assert seg.tile_slot.tolist() == [0, 3]
    tiles = [seg.perm[s:s + n].tolist() for s, n in zip(seg.tile_start.tolist(), seg.tile_len.tolist())]
    assert tiles == [[4, 5, 8, 9], [0, 1, 6, 7]]
    assert {k: v.tolist() for k, v in seg.slot_tokens.items()} == {0: [4, 5, 8, 9], 3: [0, 1, 6, 7]}


def test_segments_cut_long_segments_into_tiles():
    seg = build_segments([1, 1, -1], tokens_per_row=50, device=torch.device("cpu"))
    assert seg.block_m == 64
    assert seg.tile_slot.tolist() == [1, 1]
    assert seg.tile_len.tolist() == [64, 36]
    assert seg.perm.tolist() == list(range(100))
    assert build_segments([-1, -1], 3, torch.device("cpu")).n_tiles == 0


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
