"""`compress --dtype`: the dtype of the reconstructed model. A fp32 fine-tune compressed for
float16 stores its dense tensors in float16 (half the bytes), and `apply` rebuilds every tensor
the delta holds in that dtype: dense ones exactly the fine-tune's cast, compressed ones the
format's `(W_base.float() + Δ̂).to(dtype)`."""

from __future__ import annotations

import pytest
import torch

from codec.apply import apply_delta
from codec.bitdelta import reconstruct
from codec.checkpoint import Checkpoint
from codec.compress import CompressOptions, DeltaDQOptions, compress
from codec.errors import CodecError
from codec.format import DeltaFile
from codec.summary import summarize


def _state(dir_) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(dir_)
    return {n: ckpt.get(n) for n in ckpt.names}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_fp32_fine_tune_compressed_for_a_half_dtype(llama_pair, tmp_path, dtype):
    base_dir, ft_dir = llama_pair  # a real (tiny) fp32 Llama pair
    torch_dtype = getattr(torch, dtype)
    same = compress(base_dir, ft_dir, tmp_path / "fp32.bdelta", CompressOptions(base_name="org/tiny"))
    half = compress(
        base_dir, ft_dir, tmp_path / "half.bdelta", CompressOptions(base_name="org/tiny", dtype=dtype)
    )
    assert DeltaFile.open(same.path).dtype_name == "float32"
    delta = DeltaFile.open(half.path)
    assert delta.dtype_name == dtype
    assert half.binarized == same.binarized and half.dense == same.dense and half.dense
    # The signs and scales are the same bytes; every dense tensor takes half its fp32 bytes.
    for name in half.binarized:
        assert torch.equal(delta.sign(name), DeltaFile.open(same.path).sign(name))
    dense_fp32 = sum(DeltaFile.open(same.path).entries[n].nbytes for n in same.dense)
    assert {delta.entries[n].full.dtype for n in half.dense} == {"F16" if dtype == "float16" else "BF16"}
    assert sum(delta.entries[n].nbytes for n in half.dense) * 2 == dense_fp32
    header_growth = 256  # the header names the same tensors; only dtype strings and offsets change
    assert abs((same.delta_bytes - half.delta_bytes) - dense_fp32 // 2) < header_growth
    assert summarize(half.path)["dtype"] == dtype

    base, ft = _state(base_dir), _state(ft_dir)
    got = _state(apply_delta(base_dir, half.path, tmp_path / "out").out_dir)
    for name in half.dense:
        assert got[name].dtype == torch_dtype and torch.equal(got[name], ft[name].to(torch_dtype)), name
    for name in half.binarized:
        want = reconstruct(base[name], delta.sign(name), delta.scale(name), torch_dtype)
        assert got[name].dtype == torch_dtype and torch.equal(got[name], want), name


def test_deltadq_decodes_to_the_dtype_asked_for(llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    opts = CompressOptions(codec=DeltaDQOptions(bits=2, keep=0.5), dtype="float16")
    report = compress(base_dir, ft_dir, tmp_path / "q.bdelta", opts)
    got = _state(apply_delta(base_dir, report.path, tmp_path / "out").out_dir)
    ft = _state(ft_dir)
    assert {got[n].dtype for n in report.binarized + report.dense} == {torch.float16}
    assert all(torch.equal(got[n], ft[n].half()) for n in report.dense)


def test_the_default_keeps_the_fine_tunes_dtype_byte_for_byte(llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    a = compress(base_dir, ft_dir, tmp_path / "a.bdelta", CompressOptions(base_name="org/tiny"))
    b = compress(
        base_dir, ft_dir, tmp_path / "b.bdelta", CompressOptions(base_name="org/tiny", dtype="float32")
    )
    assert a.path.read_bytes() == b.path.read_bytes()


@pytest.mark.parametrize("dtype", ["int8", "uint8", "bool", "float8", "half"])
def test_a_non_float_target_is_refused(dtype):
    with pytest.raises(
        CodecError, match=rf"dtype must be one of float16, bfloat16, float32, float64, got '{dtype}'"
    ):
        CompressOptions(dtype=dtype)
