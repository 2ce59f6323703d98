"""The CPU path of sign deltas: the weight rebuild is bit-identical to the codec's reconstruct,
and the byte-table matmul equals the decoded matmul."""

from __future__ import annotations

import pytest
import torch

from codec.bitdelta import binarize, decode, reconstruct
from gpu_loader.layout import pack_words
from gpu_loader.sign_cpu import reconstruct_words, sign_matmul_lut
from tests.support.sign_slots import make_slots


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
