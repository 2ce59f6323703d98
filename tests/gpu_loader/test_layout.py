"""The word layout of sign planes: column 32w + j at bit j of word w, and decoding words is the
codec's decode of the file's bytes."""

from __future__ import annotations

import pytest
import torch

from codec.bitdelta import decode, pack_signs
from gpu_loader.layout import decode_words, pack_words, unpack_words_pm1, words_per_row
from tests.support.sign_slots import make_slots


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


@pytest.mark.parametrize("n", [1, 31, 32, 33, 70])
def test_unpack_words_pm1_is_plus_one_where_the_bit_is_set(n):
    gen = torch.Generator().manual_seed(n)
    bits = torch.rand(2, 5, n, generator=gen) > 0.5
    pm1 = unpack_words_pm1(pack_words(pack_signs(bits)), n)
    assert pm1.dtype == torch.float32 and pm1.shape == (2, 5, n)
    assert torch.equal(pm1, bits.float() * 2 - 1)
