"""Every way a delta file can be wrong is refused with a clear error and no partial result."""

from __future__ import annotations

import struct

import pytest
import torch

from codec.apply import apply_delta
from codec.checkpoint import TORCH_TO_ST, tensor_bytes
from codec.compress import compress
from codec.container import SafetensorsWriter, TensorSpec
from codec.errors import (
    BaseMismatchError,
    HeaderError,
    IncompatibleDeltaError,
    InvalidDeltaError,
    TruncatedFileError,
    UnsupportedFormatError,
)
from codec.format import DeltaFile

W = "model.layers.0.mlp.up_proj.weight"  # [184, 64] in the tiny pair


@pytest.fixture(scope="module")
def valid(llama_pair, tmp_path_factory):
    base_dir, ft_dir = llama_pair
    path = tmp_path_factory.mktemp("valid") / "d.bdelta"
    compress(base_dir, ft_dir, path)
    delta = DeltaFile.open(path)
    tensors = {}
    for name, e in delta.entries.items():
        for kind in ("sign", "scale", "full"):
            if getattr(e, kind) is not None:
                tensors[f"{name}.{kind}"] = getattr(delta, kind)(name).clone()
    return base_dir, dict(delta.metadata), tensors


def _write(path, tensors, metadata):
    specs = [TensorSpec(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    with SafetensorsWriter(path, specs, metadata) as w:
        for n, t in tensors.items():
            w.write(n, tensor_bytes(t))
    return path


def _refused_by_open(tmp_path, tensors, metadata, error, message):
    path = _write(tmp_path / "bad.bdelta", tensors, metadata)
    with pytest.raises(error, match=message):
        DeltaFile.open(path)


def _refused_by_apply(tmp_path, base_dir, tensors, metadata, error, message):
    path = _write(tmp_path / "bad.bdelta", tensors, metadata)
    with pytest.raises(error, match=message):
        apply_delta(base_dir, path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.bdelta"]


def test_valid_file_opens(valid, tmp_path):
    base_dir, meta, tensors = valid
    delta = DeltaFile.open(_write(tmp_path / "ok.bdelta", tensors, meta))
    assert delta.codec == "bitdelta" and W in delta.entries


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"format": None}, UnsupportedFormatError, "no 'format' key"),
        ({"format": "safetensors"}, UnsupportedFormatError, "expected 'deltastore.delta'"),
        ({"format_version": "2"}, UnsupportedFormatError, "format_version '2' is not supported"),
        ({"format_version": None}, InvalidDeltaError, "missing required key.*format_version"),
        ({"codec": "gzip"}, UnsupportedFormatError, "unknown codec 'gzip'"),
        ({"base_fingerprint": None}, InvalidDeltaError, "missing required key.*base_fingerprint"),
        ({"base_fingerprint": "md5:abc"}, InvalidDeltaError, "not sha256"),
        ({"base_model": " "}, InvalidDeltaError, "base_model' is empty"),
        ({"dtype": "int8"}, InvalidDeltaError, "'dtype' 'int8'"),
        ({"calibration": "{not json"}, InvalidDeltaError, "calibration' is not valid JSON"),
    ],
)
def test_bad_metadata(valid, tmp_path, change, error, message):
    _, meta, tensors = valid
    meta = dict(meta)
    for k, v in change.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    _refused_by_open(tmp_path, tensors, meta, error, message)


def test_no_metadata_at_all(valid, tmp_path):
    _, _, tensors = valid
    _refused_by_open(tmp_path, tensors, None, UnsupportedFormatError, "not a deltastore delta")


def test_missing_scale(valid, tmp_path):
    _, meta, tensors = valid
    tensors = dict(tensors)
    del tensors[W + ".scale"]
    _refused_by_open(tmp_path, tensors, meta, InvalidDeltaError, "no matching .scale")


def test_scale_without_sign(valid, tmp_path):
    _, meta, tensors = valid
    tensors = dict(tensors)
    del tensors[W + ".sign"]
    _refused_by_open(tmp_path, tensors, meta, InvalidDeltaError, ".scale without .sign")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scale(valid, tmp_path, value):
    _, meta, tensors = valid
    tensors = dict(tensors)
    tensors[W + ".scale"] = torch.tensor([[value]])
    _refused_by_open(tmp_path, tensors, meta, InvalidDeltaError, "NaN or Inf")


@pytest.mark.parametrize(
    ("key", "tensor", "message"),
    [
        (W + ".sign", torch.zeros(1, 184, 8, dtype=torch.int8), "must be U8"),
        (W + ".sign", torch.zeros(184, 8, dtype=torch.uint8), "must be U8 \\[P>=1"),
        (W + ".scale", torch.zeros(1, 1, dtype=torch.float16), "must be F32"),
        (W + ".scale", torch.zeros(1, 5), "does not fit .sign"),
        (W + ".scale", torch.zeros(2, 1), "does not fit .sign"),
        (
            W + ".bias",
            torch.zeros(3),
            "must end in one of .sign, .scale, .dq_codes, .dq_step, .dq_params, .lr_a, .lr_b, "
            ".lr_codes, .lr_scales, .lr_bands, .lr_shape, .full",
        ),
        (W + ".full", torch.zeros(184, 64), "both .full and other parts"),
    ],
)
def test_bad_tensor_kinds_and_dtypes(valid, tmp_path, key, tensor, message):
    _, meta, tensors = valid
    tensors = {**tensors, key: tensor}
    _refused_by_open(tmp_path, tensors, meta, InvalidDeltaError, message)


def test_sign_shape_must_match_base(valid, tmp_path):
    base_dir, meta, tensors = valid
    tensors = {**tensors, W + ".sign": torch.zeros(1, 184, 9, dtype=torch.uint8)}
    _refused_by_apply(tmp_path, base_dir, tensors, meta, IncompatibleDeltaError, r"needs \[1, 184, 8\]")


def test_sign_on_one_dimensional_base_tensor(valid, tmp_path):
    base_dir, meta, tensors = valid
    tensors = {k: v for k, v in tensors.items() if not k.startswith("model.norm.weight")}
    tensors["model.norm.weight.sign"] = torch.zeros(1, 64, 1, dtype=torch.uint8)
    tensors["model.norm.weight.scale"] = torch.zeros(1, 1)
    _refused_by_apply(tmp_path, base_dir, tensors, meta, IncompatibleDeltaError, "needs a 2-D base tensor")


def test_tensor_absent_from_base(valid, tmp_path):
    base_dir, meta, tensors = valid
    tensors = {**tensors, "model.layers.9.mlp.up_proj.weight.full": torch.zeros(2, 2)}
    _refused_by_apply(
        tmp_path, base_dir, tensors, meta, IncompatibleDeltaError, "that the base does not have"
    )


def test_full_tensor_with_non_float_dtype(valid, tmp_path):
    base_dir, meta, tensors = valid
    tensors = {**tensors, "model.norm.weight.full": torch.zeros(64, dtype=torch.int64)}
    _refused_by_apply(
        tmp_path, base_dir, tensors, meta, IncompatibleDeltaError, "dtype I64 but the base tensor is F32"
    )


@pytest.mark.parametrize("keep", [0, 7, 100, -1])
def test_truncated_file(valid, tmp_path, keep):
    _, meta, tensors = valid
    path = _write(tmp_path / "ok.bdelta", tensors, meta)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(TruncatedFileError):
        DeltaFile.open(path)


def test_oversized_header(tmp_path):
    path = tmp_path / "huge.bdelta"
    path.write_bytes(struct.pack("<Q", 200_000_000) + b"{" + b" " * 64)
    with pytest.raises(HeaderError, match="exceeds the 100000000-byte limit"):
        DeltaFile.open(path)


def test_missing_file(tmp_path):
    with pytest.raises(InvalidDeltaError, match="cannot open"):
        DeltaFile.open(tmp_path / "nope.bdelta")


@pytest.mark.parametrize(
    "content", [b"PK\x03\x04 a zip archive, not a delta" * 4, b"\x28\xb5\x2f\xfd" + b"\0" * 64]
)
def test_a_file_that_is_not_safetensors_is_named_as_such(tmp_path, content):
    path = tmp_path / "weights.bin"
    path.write_bytes(content)
    with pytest.raises(InvalidDeltaError) as info:
        DeltaFile.open(path)
    assert str(info.value) == f"{path} is not a deltastore delta (not a safetensors file)"


def test_a_base_mismatch_carries_no_cli_advice(valid, tmp_path):
    _, meta, tensors = valid
    path = _write(tmp_path / "ok.bdelta", tensors, meta)
    delta = DeltaFile.open(path)
    with pytest.raises(BaseMismatchError) as info:
        delta.check_base({}, "sha256:" + "0" * 64)
    assert "sha256:" + "0" * 64 in str(info.value) and "--force" not in str(info.value)
