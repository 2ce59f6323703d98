"""Word layout of the slot pool's bit planes (sign planes and DeltaDQ masks): a row's bits packed
into int32 words, bit j of word w = input column 32w + j; the helpers every path shares.

The words are the file's LSB-first sign bytes padded to 4 bytes and read little-endian.
"""

from __future__ import annotations

import torch

from codec.bitdelta import decode, pm1_lut


def words_per_row(in_features: int) -> int:
    return (in_features + 31) // 32


def pack_words(sign: torch.Tensor) -> torch.Tensor:
    """File signs uint8 [..., ceil(in/8)] -> int32 words [..., ceil(in/32)] (zero padding bytes)."""
    if sign.dtype != torch.uint8:
        raise TypeError(f"pack_words expects uint8 signs, got {sign.dtype}")
    nb = sign.shape[-1]
    pad = -nb % 4
    if pad:
        sign = torch.nn.functional.pad(sign, (0, pad))
    return sign.contiguous().view(torch.int32)


def unpack_words_pm1(words: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 words [..., W] -> fp32 ±1 [..., in_features] (bit 1 = +1)."""
    by = words.contiguous().view(torch.uint8)
    pm1 = pm1_lut(words.device)[by.long()]
    return pm1.reshape(*words.shape[:-1], -1)[..., :in_features]


def decode_words(words: torch.Tensor, scales: torch.Tensor, in_features: int) -> torch.Tensor:
    """Δ̂ in fp32 from one slot's words [P, out, W] and scales [P, out | 1]: the words are the
    file's sign bytes viewed as int32 (`pack_words`), so this is `codec.bitdelta.decode` on their bytes."""
    return decode(words.contiguous().view(torch.uint8), scales, in_features)
