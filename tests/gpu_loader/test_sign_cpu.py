"""The CPU path of sign deltas: the weight rebuild is bit-identical to the codec's reconstruct,
and the byte-table matmul (torch ops, and the compiled kernel) equals the decoded reference
within the per-dtype tolerance, leaving base rows untouched."""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch

from codec.bitdelta import binarize, decode, reconstruct
from gpu_loader import sign_cpu
from gpu_loader.layout import decode_words, pack_words
from gpu_loader.segments import build_segments
from gpu_loader.sgmv_reference import sgmv_sign_reference
from gpu_loader.sign_cpu import reconstruct_words, sign_delta_add_, sign_matmul_lut
from tests.support.sign_slots import assert_close, make_slots


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


# --------------------------------------------------------------------------------------------
# the compiled byte-table kernel (and the torch table path it replaces) against the reference
# --------------------------------------------------------------------------------------------
def compiled_kernel():
    kernel = sign_cpu.cpu_kernel()
    if kernel is None:
        pytest.skip(f"the compiled CPU kernel is unavailable: {sign_cpu.cpu_kernel_error()}")
    return kernel


@functools.cache
def portable_kernel():
    """The byte-table build that machines without AVX-512 run (this one may have AVX-512)."""
    try:
        return sign_cpu.build_cpu_kernel(portable=True)
    except Exception as exc:  # no compiler here: the compiled fixtures skip
        pytest.skip(f"cannot build the portable CPU kernel: {exc}")


@pytest.fixture(params=["compiled", "compiled-portable", "torch-ops"])
def table_path(request, monkeypatch):
    """Every way `sign_delta_add_` computes: the compiled kernel for this machine, its portable
    (non-AVX-512) build, and torch ops when no kernel is available."""
    if request.param == "compiled":
        compiled_kernel()
    elif request.param == "compiled-portable":
        compiled_kernel()
        kernel = portable_kernel()
        monkeypatch.setattr(sign_cpu, "cpu_kernel", lambda: kernel)
    else:
        monkeypatch.setattr(sign_cpu, "cpu_kernel", lambda: None)
    return request.param


def pool_slots(n_slots, out, inn, planes, per_row, seed):
    """Words and scales as the pool holds them: scales [S, P, out] (per-matrix ones broadcast)."""
    words, scales, _, _ = make_slots(n_slots, out, inn, planes=planes, per_row=per_row, seed=seed)
    return words, scales.expand(-1, -1, out).contiguous()


SIZES = [(1, 1), (7, 33), (33, 7), (70, 31), (4097, 17), (33, 4097)]  # (in, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inn,out", SIZES, ids=[f"in{i}-out{o}" for i, o in SIZES])
@pytest.mark.parametrize("planes,per_row", [(1, False), (1, True), (2, True), (2, False)])
def test_table_path_matches_the_reference(table_path, inn, out, planes, per_row, dtype):
    words, scales = pool_slots(3, out, inn, planes, per_row, seed=inn * 7 + out)
    # slot 0: one token, slot 2: five (a chunk of 8 padded), slot 1: base-only rows around them
    rows = [2, -1, 0, 2, 2, -1, 2, 2]
    gen = torch.Generator().manual_seed(planes)
    x = torch.randn(len(rows), inn, generator=gen).to(dtype)
    y0 = torch.randn(len(rows), out, generator=gen).to(dtype)
    seg = build_segments(rows, 1, x.device)
    got = sign_delta_add_(y0.clone(), x, words, scales, seg, [(0, planes), (2, planes)])
    ref = sgmv_sign_reference(x, y0.clone(), words, scales, seg)
    assert_close(got, ref)
    base = [i for i, r in enumerate(rows) if r < 0]
    assert torch.equal(got[base], y0[base])  # rows without a delta are untouched, bit for bit


@pytest.mark.parametrize("tokens", [8, 9, 17, 40])
def test_more_tokens_than_a_chunk_are_split_into_chunks(table_path, tokens):
    words, scales = pool_slots(2, 29, 300, planes=2, per_row=True, seed=tokens)
    rows = [1] * tokens + [0, -1]
    x = torch.randn(len(rows), 300)
    y0 = torch.randn(len(rows), 29)
    seg = build_segments(rows, 1, x.device)
    got = sign_delta_add_(y0.clone(), x, words, scales, seg, [(0, 2), (1, 2)])
    assert_close(got, sgmv_sign_reference(x, y0.clone(), words, scales, seg))


def test_only_the_slot_s_own_planes_are_read(table_path):
    """A one-plane delta in a two-plane pool: plane 1 may hold anything, it must not be added."""
    words, scales = pool_slots(2, 16, 40, planes=2, per_row=True, seed=3)
    rows = [0, 1, 1]
    x = torch.randn(3, 40)
    y0 = torch.randn(3, 16)
    seg = build_segments(rows, 1, x.device)
    got = sign_delta_add_(y0.clone(), x, words, scales, seg, [(0, 1), (1, 2)])
    want = y0.clone()
    want[0] += x[0] @ decode_words(words[0, :1], scales[0, :1], 40).T
    want[1:] += x[1:] @ decode_words(words[1], scales[1], 40).T
    assert_close(got, want)


def test_prefill_shaped_tokens_per_row_group_by_slot(table_path):
    words, scales = pool_slots(2, 24, 50, planes=1, per_row=True, seed=5)
    rows = [1, -1, 0]
    x = torch.randn(3 * 4, 50)  # 4 tokens per row, flattened
    y0 = torch.randn(3 * 4, 24)
    seg = build_segments(rows, 4, x.device)
    got = sign_delta_add_(y0.clone(), x, words, scales, seg, [(0, 1), (1, 1)])
    assert_close(got, sgmv_sign_reference(x, y0.clone(), words, scales, seg))


def test_kernel_rejects_arguments_that_do_not_match():
    kernel = compiled_kernel()
    words, scales = pool_slots(2, 8, 40, planes=1, per_row=True, seed=0)
    x, y = torch.randn(2, 40), torch.randn(2, 8)
    perm = torch.tensor([0, 1])
    groups = torch.tensor([[0, 0, 2, 1]])
    with pytest.raises(RuntimeError, match="words do not match x and y"):
        kernel.sign_delta_add(y, torch.randn(2, 70), words, scales, perm, groups)
    with pytest.raises(RuntimeError, match="x and y must share a dtype"):
        kernel.sign_delta_add(y.half(), x, words, scales, perm, groups)
    with pytest.raises(RuntimeError, match="slot or planes out of range"):
        kernel.sign_delta_add(y, x, words, scales, perm, torch.tensor([[2, 0, 2, 1]]))
    with pytest.raises(RuntimeError, match="tokens out of range"):
        kernel.sign_delta_add(y, x, words, scales, perm, torch.tensor([[0, 1, 2, 1]]))
    with pytest.raises(RuntimeError, match="token index out of range"):
        kernel.sign_delta_add(y, x, words, scales, torch.tensor([0, 5]), groups)
    with pytest.raises(RuntimeError, match="scales must be contiguous float32"):
        kernel.sign_delta_add(y, x, words, scales.double(), perm, groups)


def test_a_kernel_that_cannot_be_built_leaves_the_torch_path_serving(monkeypatch, tmp_path):
    monkeypatch.setattr(sign_cpu, "_kernel", None)
    monkeypatch.setattr(sign_cpu, "_kernel_error", None)
    monkeypatch.setattr(sign_cpu, "_SOURCE", tmp_path / "missing.cpp")
    with pytest.warns(RuntimeWarning, match="compiled CPU delta kernel is unavailable"):
        assert sign_cpu.cpu_kernel() is None
    assert sign_cpu.cpu_kernel_error()
    words, scales = pool_slots(1, 5, 20, planes=1, per_row=False, seed=1)
    x, y0 = torch.randn(2, 20), torch.randn(2, 5)
    seg = build_segments([0, -1], 1, x.device)
    got = sign_delta_add_(y0.clone(), x, words, scales, seg, [(0, 1)])
    assert_close(got, sgmv_sign_reference(x, y0.clone(), words, scales, seg))


def test_the_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(sign_cpu, "_kernel", None)
    monkeypatch.setattr(sign_cpu, "_kernel_error", None)
    monkeypatch.setenv("DELTASTORE_CPU_KERNEL", "0")
    assert sign_cpu.cpu_kernel() is None
    assert sign_cpu.cpu_kernel_error() == "turned off by DELTASTORE_CPU_KERNEL=0"


def test_a_build_lock_left_by_a_killed_build_does_not_block_loading():
    compiled_kernel()
    name = f"deltastore_sign_delta_cpu_{torch.backends.cpu.get_cpu_capability().lower()}"
    lock = sign_cpu.kernel_build_dir(name) / "lock"
    lock.touch()
    old = time.time() - 2 * sign_cpu._STALE_LOCK_SECONDS
    os.utime(lock, (old, old))
    assert sign_cpu.build_cpu_kernel() is not None  # would wait on the lock forever otherwise
    assert not lock.exists()
