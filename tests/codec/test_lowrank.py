"""lowrank-mp and hybrid math: the band table's checks and sizes, the budget promise, the bit-exact
decode against an independent numpy reading of docs/lowrank.md, and the safety rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from codec import bitdelta, hybrid, lowrank
from codec.errors import CodecError
from codec.lowrank_params import Band, Layout, budget_bits, rank_cost_bits


def _low_rank_delta(out: int, inn: int, rank: int, noise: float, seed: int = 0):
    """A base and a fine-tune whose delta is rank-`rank` with decaying singular values plus noise."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(out, inn, generator=gen) * 0.05
    u = torch.linalg.qr(torch.randn(out, rank, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(inn, rank, generator=gen))[0]
    s = 0.01 * torch.logspace(0, -1.5, rank)
    delta = (u * s) @ v.T + noise * torch.randn(out, inn, generator=gen)
    return base + delta, base


# --- band table -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "band table is empty"),
        ([[1, 4, 2, 64]], "band 0 starts at singular vector 1, expected 0"),
        ([[0, 4, 2, 64], [5, 8, 2, 64]], "band 1 starts at singular vector 5, expected 4"),
        ([[0, 0, 2, 64]], r"band 0 is empty or reversed: \[0, 0\)"),
        ([[0, 4, 9, 64]], "band 0 has 9 bits, expected 1 to 8"),
        ([[0, 4, 0, 64]], "band 0 has 0 bits, expected 1 to 8"),
        ([[0, 4, 2, 0]], "band 0 has group size 0"),
        ([[0, 17, 2, 64]], r"rank 17 exceeds the tensor's full rank 16 \(16x40\)"),
    ],
)
def test_bad_band_tables_are_refused(rows, message):
    with pytest.raises(CodecError, match=message):
        Layout.from_rows(rows, 16, 40)


def test_stored_bits_counts_codes_steps_and_table():
    layout = Layout((Band(0, 2, 8, 64), Band(2, 5, 3, 32)))
    out, inn = 10, 100
    # 8 bits: 100 + 10 bytes per vector; 3 bits: ceil(300/8) + ceil(30/8) = 38 + 4 bytes.
    assert layout.code_bytes(out, inn) == 2 * 110 + 3 * 42
    # Groups: ceil(100/64) + ceil(10/64) = 3 at g 64; ceil(100/32) + 1 = 5 at g 32.
    assert layout.step_count(out, inn) == 2 * 3 + 3 * 5
    assert layout.stored_bits(out, inn) == 8 * 346 + 16 * 21 + 128 * 2 + 64
    assert layout.rank == 5
    assert layout.describe() == "8b×2 + 3b×3 (g32/64)"


@pytest.mark.parametrize("shape", [(576, 576), (576, 1536), (192, 576), (64, 40)])
@pytest.mark.parametrize("ratio", [4, 16, 32, 64])
def test_every_candidate_layout_keeps_the_ratio_and_fills_the_budget(shape, ratio):
    out, inn = shape
    budget = budget_bits(out, inn, ratio)
    layouts = lowrank.layouts_for_budget(out, inn, budget, 128)
    assert layouts
    for layout in layouts:
        layout.check(out, inn)
        assert layout.stored_bits(out, inn) <= budget
        # The fill band is as large as the budget (or the rank limit) allows.
        last = layout.bands[-1]
        more = layout.stored_bits(out, inn) + rank_cost_bits(out, inn, last.bits, 128)
        assert more > budget or layout.rank == min(out, inn) or len(layout.bands) < 2


def test_a_ratio_leaving_no_room_for_one_vector_is_refused():
    ft, base = _low_rank_delta(8, 16, 2, 0.0)
    with pytest.raises(
        CodecError,
        match=r"w: ratio 1000 leaves 2 bits for a 8x16 tensor, less than one singular vector pair at 2 bits "
        r"\(272 bits\)",
    ):
        lowrank.choose(ft, base, "w", ratio=1000)


# --- quantization -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("length", [64, 100, 1])
def test_quantize_codes_lie_on_the_grid_of_bf16_steps(bits, length):
    x = torch.randn(5, length, generator=torch.Generator().manual_seed(bits))
    codes, steps = lowrank.quantize(x, bits, 32)
    assert codes.shape == (5, length) and int(codes.max()) < 2**bits
    assert steps.shape == (5, math.ceil(length / 32))
    assert torch.equal(steps, steps.to(torch.bfloat16).float())
    # Each code is the nearest grid level for its group's step (clamped to the grid).
    centre = (2**bits - 1) / 2
    s = steps.repeat_interleave(32, dim=1)[:, :length]
    nearest = torch.clamp(torch.round(x / s + centre), 0, 2**bits - 1)
    assert torch.equal(codes.float(), nearest)


def test_quantization_error_shrinks_with_bits():
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(3))
    errors = []
    for bits in (1, 2, 3, 4, 8):
        codes, steps = lowrank.quantize(x, bits, 64)
        errors.append(float((lowrank.dequantize(codes, steps, bits, 64) - x).pow(2).sum()))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-3 * errors[0]


def test_an_all_zero_group_decodes_to_zero():
    x = torch.zeros(2, 70)
    x[1, 64:] = 1.0
    codes, steps = lowrank.quantize(x, 2, 64)
    assert torch.equal(lowrank.dequantize(codes, steps, 2, 64)[:, :64], torch.zeros(2, 64))


# --- decode: bit-exact against the spec ---------------------------------------------------------


def _numpy_decode(codes: np.ndarray, steps_bf16_bits: np.ndarray, bands: np.ndarray, out: int, inn: int):
    """docs/lowrank.md's decode, written from the text alone (no deltastore code)."""
    steps = (steps_bf16_bits.astype(np.uint32) << 16).view(np.float32)  # bf16 = top half of fp32
    byte = step = 0
    a_rows, b_cols = [], []
    for start, end, k, g in bands.tolist():
        n = end - start
        for length, dest in ((inn, a_rows), (out, b_cols)):
            width = (length * k + 7) // 8
            block = codes[byte : byte + n * width].reshape(n, width)
            bitstream = np.unpackbits(block, axis=1, bitorder="little")[:, : length * k]
            q = (bitstream.reshape(n, length, k).astype(np.uint32) << np.arange(k, dtype=np.uint32)).sum(-1)
            ngroups = -(-length // g)
            s = steps[step : step + n * ngroups].reshape(n, ngroups)
            per_element = np.repeat(s, g, axis=1)[:, :length]
            dest.append(per_element * (q.astype(np.float32) - np.float32((2**k - 1) / 2)))
            byte += n * width
            step += n * ngroups
    assert byte == len(codes) and step == len(steps)
    return np.concatenate(a_rows), np.concatenate(b_cols).T


def test_decode_matches_an_independent_numpy_decoder():
    ft, base = _low_rank_delta(70, 100, 12, 1e-4)
    delta = lowrank.delta_of(ft, base)
    layout = Layout((Band(0, 2, 8, 32), Band(2, 7, 3, 32), Band(7, 11, 2, 32)))
    enc = lowrank.encode(delta, lowrank.Svd.of(delta), layout)
    a, b = lowrank.decode_factors(enc.codes, enc.steps, layout, 70, 100)
    want_a, want_b = _numpy_decode(
        enc.codes.numpy(), enc.steps.view(torch.int16).numpy().view(np.uint16), enc.bands.numpy(), 70, 100
    )
    assert np.array_equal(a.numpy(), want_a) and np.array_equal(b.numpy(), want_b)
    # What the encoder multiplied is what decoding gives.
    assert torch.equal(a, enc.a) and torch.equal(b, enc.b)
    assert np.allclose(lowrank.delta_rows(a, b, slice(0, 70)).numpy(), want_b @ want_a, rtol=1e-5, atol=1e-9)


def test_decode_of_hand_made_bytes():
    """out 3, in 5, one band: rank 1 at 2 bits, group size 4 (a: groups of 4 + 1; b: 3)."""
    # a codes 0, 1, 2, 3, 1: stream bits (LSB of each code first) 00 10 01 11 10
    #   -> byte 0 = 0b11100100, byte 1 = 0b00000001 (6 padding bits)
    # b codes 3, 0, 2: 11 00 01 -> byte 0b00100011
    codes = torch.tensor([0b11100100, 0b00000001, 0b00100011], dtype=torch.uint8)
    steps = torch.tensor([0.5, 2.0, 0.25], dtype=torch.bfloat16)  # a group 0, a group 1, b group 0
    layout = Layout.from_rows([[0, 1, 2, 4]], 3, 5)
    a, b = lowrank.decode_factors(codes, steps, layout, 3, 5)
    assert a.tolist() == [[-0.75, -0.25, 0.25, 0.75, -1.0]]  # 0.5·(q − 1.5); last group step 2
    assert b.tolist() == [[0.375], [-0.375], [0.125]]  # 0.25·(q − 1.5)


def test_decode_refuses_tensors_of_the_wrong_length():
    layout = Layout.from_rows([[0, 1, 2, 4]], 3, 5)
    with pytest.raises(CodecError, match="lr_codes has 4 bytes, the band table needs 3"):
        lowrank.decode_factors(
            torch.zeros(4, dtype=torch.uint8), torch.zeros(3, dtype=torch.bfloat16), layout, 3, 5
        )
    with pytest.raises(CodecError, match="lr_scales has 2 steps, the band table needs 3"):
        lowrank.decode_factors(
            torch.zeros(3, dtype=torch.uint8), torch.zeros(2, dtype=torch.bfloat16), layout, 3, 5
        )


def test_reconstruct_blocks_is_base_plus_product_rounded_once():
    ft, base = _low_rank_delta(300, 64, 8, 1e-4)
    base16 = base.half()
    delta = lowrank.delta_of(ft, base16)
    enc = lowrank.encode(delta, lowrank.Svd.of(delta), Layout((Band(0, 6, 4, 32),)))
    got = torch.cat(list(lowrank.reconstruct_blocks(base16, enc.a, enc.b, torch.float16)))
    want = torch.cat(
        [(base16[r : r + 256].float() + torch.matmul(enc.b[r : r + 256], enc.a)).half() for r in (0, 256)]
    )
    assert torch.equal(got, want)


# --- choosing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [8, 16, 32])
def test_choose_keeps_the_ratio_and_beats_plain_truncation(ratio):
    ft, base = _low_rank_delta(128, 192, 24, 2e-5)
    choice = lowrank.choose(ft, base, "w", ratio=ratio)
    assert choice.kind == "lowrank"
    layout = choice.encoded.layout
    assert layout.stored_bits(128, 192) <= budget_bits(128, 192, ratio)
    delta = lowrank.delta_of(ft, base)
    assert choice.error == pytest.approx(
        float((delta - choice.encoded.b @ choice.encoded.a).pow(2).sum()), rel=1e-4
    )
    # Better than an fp16 truncated SVD of the same bytes (16 bits × (out + in) per vector).
    r16 = budget_bits(128, 192, ratio) // (16 * (128 + 192))
    a, b = lowrank.Svd.of(delta).factors(r16)
    assert choice.error < float((delta - b.half().float() @ a.half().float()).pow(2).sum())


def test_safety_rule_stores_signs_when_they_are_closer():
    """An iid-noise delta has no low-rank structure: 1-bit signs beat any rank at 16x."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(96, 96, generator=gen)
    ft = base + 1e-3 * torch.randn(96, 96, generator=gen)
    choice = lowrank.choose(ft, base, "w", ratio=16)
    assert choice.kind == "signs"
    sign, scale = bitdelta.binarize(ft, base)
    assert torch.equal(choice.sign, sign) and torch.equal(choice.scale, scale)
    errors = dict(choice.alternatives)
    assert errors["signs"] < errors["lowrank"]
    # Above 16x the signs do not fit the budget, so they are not an alternative.
    assert lowrank.choose(ft, base, "w", ratio=32).kind == "lowrank"


def test_calibration_weight_is_the_error_that_is_minimised():
    ft, base = _low_rank_delta(64, 128, 16, 5e-5)
    weight = torch.ones(128)
    weight[:8] = 100.0  # a few high-energy input channels
    weighted = lowrank.choose(ft, base, "w", ratio=16, weight=weight)
    plain = lowrank.choose(ft, base, "w", ratio=16)
    delta = lowrank.delta_of(ft, base)
    assert weighted.error == pytest.approx(
        lowrank.weighted_error(delta, weighted.encoded.b @ weighted.encoded.a, weight), rel=1e-4
    )

    # The channels that count are reconstructed better than the unweighted choice does.
    def head_error(c):
        return float((delta - c.encoded.b @ c.encoded.a)[:, :8].pow(2).sum())

    assert head_error(weighted) < head_error(plain)


def test_weighted_svd_factors_the_delta_and_is_best_at_its_rank_under_the_weight():
    ft, base = _low_rank_delta(64, 96, 20, 5e-5)
    delta = lowrank.delta_of(ft, base)
    weight = torch.linspace(0.01, 10.0, 96)
    svd = lowrank.Svd.weighted(delta, weight)
    assert torch.allclose((svd.u * svd.s) @ svd.vh, delta, atol=1e-7)
    a_w, b_w = svd.factors(6)
    a, b = lowrank.Svd.of(delta).factors(6)
    assert lowrank.weighted_error(delta, b_w @ a_w, weight) < lowrank.weighted_error(delta, b @ a, weight)
    assert lowrank.weighted_error(delta, b @ a, None) < lowrank.weighted_error(delta, b_w @ a_w, None)


# --- hybrid -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("planes", "per_row"), [(1, False), (2, True)])
def test_hybrid_rank_for_ratio_spends_the_budget(planes, per_row):
    out, inn = 576, 1536
    for ratio in (4, 8, 12) if planes == 1 else (2, 4, 6):  # P planes alone are 16/P x
        r = hybrid.rank_for_ratio(out, inn, ratio, planes, per_row)
        budget = budget_bits(out, inn, ratio)
        assert hybrid.stored_bits(out, inn, r, planes, per_row) <= budget
        assert hybrid.stored_bits(out, inn, r + 1, planes, per_row) > budget
        assert r >= 1
    assert hybrid.rank_for_ratio(out, inn, 16 / planes, planes, per_row) == 0


def test_hybrid_residual_signs_are_bitdelta_of_what_the_factors_leave():
    ft, base = _low_rank_delta(300, 80, 10, 1e-4)
    h = hybrid.encode(ft, base, rank=6)
    assert h.a.dtype == torch.float16 and h.a.shape == (6, 80) and h.b.shape == (300, 6)
    delta = lowrank.delta_of(ft, base)
    product = torch.cat([lowrank.delta_rows(h.a, h.b, slice(r, r + 256)) for r in (0, 256)])
    residual = delta - product
    sign, scale = bitdelta.binarize(residual)
    assert torch.equal(h.sign, sign) and torch.equal(h.scale, scale)
    decoded = hybrid.decode(h, 80)
    assert torch.equal(decoded, product + bitdelta.decode(sign, scale, 80))
    # The low-rank part makes the signs' job smaller: closer than signs alone, and than rank alone.
    err = float((delta - decoded).pow(2).sum())
    assert err < float((delta - bitdelta.decode(*bitdelta.binarize(ft, base), 80)).pow(2).sum())
    assert err < float(residual.pow(2).sum())


def test_hybrid_reconstruct_blocks_match_decode():
    ft, base = _low_rank_delta(300, 80, 10, 1e-4)
    h = hybrid.encode(ft, base, rank=4, planes=2, scale_mode="per-row")
    got = torch.cat(list(hybrid.reconstruct_blocks(base, h.a, h.b, h.sign, h.scale, torch.float32)))
    assert torch.equal(got, base + hybrid.decode(h, 80))


@pytest.mark.parametrize("rank", [0, 81])
def test_hybrid_rank_out_of_range_is_refused(rank):
    ft, base = _low_rank_delta(100, 80, 4, 0.0)
    with pytest.raises(CodecError, match=f"rank must be between 1 and 80 for a 100x80 tensor, got {rank}"):
        hybrid.encode(ft, base, rank=rank)
