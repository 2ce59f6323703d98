"""BitDelta math against an independent numpy computation: bit-exact signs, exact scales."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codec.bitdelta import binarize, decode, pack_signs, reconstruct, reconstruct_cpu, unpack_signs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IN_SIZES = [1, 7, 9, 33, 4097]


def _np_expected(ft: torch.Tensor, base: torch.Tensor, planes: int, per_row: bool):
    """Residual binarization written directly from the format's definition, in numpy."""
    residual = ft.float().numpy().astype(np.float32) - base.float().numpy().astype(np.float32)
    signs, scales = [], []
    for _ in range(planes):
        bits = residual >= 0
        absval = np.abs(residual).astype(np.float64)
        scale = (
            (absval.sum(axis=1) / residual.shape[1]) if per_row else np.array([absval.sum() / residual.size])
        )
        scale = scale.astype(np.float32)
        # LSB-first along the input axis: bit j of byte b is column 8b + j.
        packed = np.zeros((residual.shape[0], (residual.shape[1] + 7) // 8), dtype=np.uint8)
        for col in range(residual.shape[1]):
            packed[:, col // 8] |= bits[:, col].astype(np.uint8) << (col % 8)
        signs.append(packed)
        scales.append(scale)
        residual = residual - np.where(bits, 1.0, -1.0).astype(np.float32) * scale.reshape(-1, 1)
    return np.stack(signs), np.stack(scales)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_features", IN_SIZES)
@pytest.mark.parametrize("per_row", [False, True])
def test_one_plane_golden(dtype, in_features, per_row):
    g = torch.Generator().manual_seed(in_features)
    base = torch.randn(5, in_features, generator=g).to(dtype)
    ft = (base.float() + 0.01 * torch.randn(5, in_features, generator=g)).to(dtype)
    sign, scale = binarize(ft, base, 1, "per-row" if per_row else "per-matrix")
    want_sign, want_scale = _np_expected(ft, base, 1, per_row)
    assert sign.dtype == torch.uint8 and sign.shape == (1, 5, (in_features + 7) // 8)
    assert scale.dtype == torch.float32 and scale.shape == (1, 5 if per_row else 1)
    assert np.array_equal(sign.numpy(), want_sign)
    assert np.array_equal(scale.numpy(), want_scale)


@pytest.mark.parametrize("in_features", [9, 33, 4097])
def test_three_planes_golden(in_features):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(6, in_features, generator=g)
    ft = base + 0.05 * torch.randn(6, in_features, generator=g)
    sign, scale = binarize(ft, base, 3, "per-row")
    want_sign, want_scale = _np_expected(ft, base, 3, True)
    assert np.array_equal(sign.numpy(), want_sign)
    np.testing.assert_array_equal(scale.numpy(), want_scale)


def test_padding_bits_are_zero_and_zero_delta_sets_bit():
    base = torch.zeros(2, 9)
    ft = torch.zeros(2, 9)  # delta == 0 everywhere: the encoder sets bit = 1 (delta >= 0)
    sign, scale = binarize(ft, base)
    assert sign[0, :, 0].tolist() == [0xFF, 0xFF]
    assert sign[0, :, 1].tolist() == [0x01, 0x01]  # column 8 set, 7 padding bits zero
    assert scale.item() == 0.0


@pytest.mark.parametrize("n", [1, 7, 8, 9, 31, 32, 33, 4097])
def test_pack_unpack_round_trip(n):
    bits = torch.rand(3, n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_signs(bits)
    assert np.array_equal(packed.numpy(), np.packbits(bits.numpy(), axis=-1, bitorder="little"))
    assert torch.equal(unpack_signs(packed, n), bits)


def test_int32_word_view_matches_columns():
    """A row with in % 32 == 0 reinterprets as int32 words, bit j of word w = column 32w + j."""
    bits = torch.rand(2, 64, generator=torch.Generator().manual_seed(3)) > 0.5
    words = pack_signs(bits).view(torch.int32)
    for col in range(64):
        got = (words[:, col // 32] >> (col % 32)) & 1
        assert torch.equal(got.bool(), bits[:, col])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("planes", [1, 2])
@pytest.mark.parametrize("mode", ["per-row", "per-matrix"])
def test_reconstruct_is_base_plus_sign_times_scale(dtype, planes, mode):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(70, 33, generator=g).to(dtype)
    ft = (base.float() + 0.02 * torch.randn(70, 33, generator=g)).to(dtype)
    sign, scale = binarize(ft, base, planes, mode)
    want_sign, want_scale = _np_expected(ft, base, planes, mode == "per-row")
    delta = np.zeros((70, 33), np.float32)
    for p in range(planes):
        bits = np.unpackbits(want_sign[p], axis=-1, count=33, bitorder="little").astype(bool)
        delta += np.where(bits, 1.0, -1.0).astype(np.float32) * want_scale[p].reshape(-1, 1)
    want = torch.from_numpy(base.float().numpy() + delta).to(dtype)
    assert torch.equal(reconstruct(base, sign, scale, dtype), want)
    assert torch.equal(reconstruct_cpu(base, sign, scale, dtype), want)


def test_more_planes_reduce_error():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(64, 96, generator=g)
    ft = base + 0.03 * torch.randn(64, 96, generator=g)
    errors = []
    for planes in (1, 2, 3):
        sign, scale = binarize(ft, base, planes)
        errors.append(float((reconstruct(base, sign, scale, torch.float32) - ft).norm()))
    assert errors[0] > errors[1] > errors[2]


def test_decode_matches_unpacked_definition():
    sign = torch.tensor([[[0b00000101]]], dtype=torch.uint8)
    scale = torch.tensor([[0.5]])
    assert decode(sign, scale, 3).tolist() == [[0.5, -0.5, 0.5]]


def test_binarize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        binarize(torch.zeros(3))
    with pytest.raises(ValueError, match="planes"):
        binarize(torch.zeros(2, 2), planes=0)
    with pytest.raises(ValueError, match="scale mode"):
        binarize(torch.zeros(2, 2), scale_mode="per-col")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape mismatch"):
        binarize(torch.zeros(2, 2), torch.zeros(2, 3))
