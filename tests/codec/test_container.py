"""The safetensors container: byte-exact layout, stock-library compatibility, strict offsets."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as st_load_numpy
from safetensors.torch import save_file as st_save

from codec.container import (
    MAX_HEADER_SIZE,
    SafetensorsWriter,
    SpooledSafetensorsWriter,
    TensorSpec,
    encode_header,
    read_header,
)
from codec.errors import HeaderError, TruncatedFileError


def _raw_file(header: dict, data: bytes = b"", pad: bool = True) -> bytes:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def test_encode_header_golden_bytes():
    specs = [TensorSpec("a", "U8", (2, 3)), TensorSpec("b", "F32", (1,))]
    got = encode_header(specs, {"k": "v"})
    doc = (
        b'{"__metadata__":{"k":"v"},"a":{"dtype":"U8","shape":[2,3],"data_offsets":[0,6]},'
        b'"b":{"dtype":"F32","shape":[1],"data_offsets":[6,10]}}'
    )
    doc += b" " * (-len(doc) % 8)
    assert got == struct.pack("<Q", len(doc)) + doc
    assert len(got) % 8 == 0


def test_writer_output_loads_with_stock_library(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    b = np.array([1.5, -2.0], dtype=np.float32)
    specs = [TensorSpec("a", "U8", a.shape), TensorSpec("b", "F32", b.shape)]
    with SafetensorsWriter(tmp_path / "x.safetensors", specs, {"m": "1"}) as w:
        w.write("a", a.tobytes())
        w.write("b", b.tobytes())
    loaded = st_load_numpy(tmp_path / "x.safetensors")
    assert np.array_equal(loaded["a"], a) and np.array_equal(loaded["b"], b)
    header = read_header(tmp_path / "x.safetensors")
    assert header.metadata == {"m": "1"}
    assert not (tmp_path / "x.safetensors.incomplete").exists()


def test_spooled_writer_matches_direct_writer(tmp_path):
    tensors = {
        "w": np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32),
        "z": np.zeros((0,), np.uint8),
    }
    specs = [TensorSpec(k, "F32" if v.dtype == np.float32 else "U8", v.shape) for k, v in tensors.items()]
    spool = SpooledSafetensorsWriter(tmp_path / "s.safetensors")
    for spec in specs:
        spool.add(spec, tensors[spec.name].tobytes())
    spool.close({"a": "b"})
    with SafetensorsWriter(tmp_path / "d.safetensors", specs, {"a": "b"}) as w:
        for spec in specs:
            w.write(spec.name, tensors[spec.name].tobytes())
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "d.safetensors").read_bytes()


def test_writer_refuses_out_of_order_and_short_tensors(tmp_path):
    specs = [TensorSpec("a", "U8", (2,)), TensorSpec("b", "U8", (2,))]
    w = SafetensorsWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(ValueError, match="out of order"):
        w.write("b", b"xx")
    with pytest.raises(ValueError, match="got 1 bytes"):
        w.write("a", b"x")
    w.write("a", b"xx")
    with pytest.raises(ValueError, match="only 1 of 2"):
        w.close()
    assert not (tmp_path / "x.safetensors").exists()
    assert not (tmp_path / "x.safetensors.incomplete").exists()


def test_reads_files_written_by_stock_library(tmp_path):
    tensors = {"x": torch.randn(3, 5, dtype=torch.bfloat16), "y": torch.arange(4, dtype=torch.int64)}
    st_save(tensors, tmp_path / "s.safetensors", metadata={"format": "pt"})
    header = read_header(tmp_path / "s.safetensors")
    assert header.tensors["x"].dtype == "BF16" and header.tensors["x"].shape == (3, 5)
    assert header.tensors["y"].nbytes == 32
    assert header.metadata == {"format": "pt"}


@pytest.mark.parametrize(
    ("blob", "error", "message"),
    [
        (b"", TruncatedFileError, "at least 8"),
        (b"\x01\x00\x00", TruncatedFileError, "at least 8"),
        (struct.pack("<Q", 100) + b"{}", TruncatedFileError, "header claims 100 bytes"),
        (struct.pack("<Q", MAX_HEADER_SIZE + 1) + b" " * 16, HeaderError, "exceeds"),
        (struct.pack("<Q", 2**64 - 1), HeaderError, "exceeds"),
        (
            _raw_file({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b"ab"),
            TruncatedFileError,
            "needs 4 bytes",
        ),
        (
            _raw_file({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"abcd"),
            HeaderError,
            "trailing",
        ),
        (
            _raw_file({"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 2]}}, b"ab"),
            HeaderError,
            "needs 3 bytes",
        ),
        (
            _raw_file({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 2]}}, b"ab"),
            HeaderError,
            "unknown dtype",
        ),
        (
            _raw_file({"a": {"dtype": "U8", "shape": [-2], "data_offsets": [0, 2]}}, b"ab"),
            HeaderError,
            "non-negative",
        ),
        (
            _raw_file({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"a"),
            HeaderError,
            "non-negative",
        ),
        (
            _raw_file({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 0]}}, b"ab"),
            HeaderError,
            "data_offsets",
        ),
        (
            _raw_file({"a": {"dtype": "U8", "shape": [2], "data_offsets": [-1, 1]}}, b"ab"),
            HeaderError,
            "data_offsets",
        ),
        (
            _raw_file(
                {
                    "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                    "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
                },
                b"abc",
            ),
            HeaderError,
            "overlapping",
        ),
        (
            _raw_file({"a": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, b"abc"),
            HeaderError,
            "overlapping or gapped",
        ),
        (_raw_file({"a": {"dtype": "U8", "shape": [2]}}, b"ab"), HeaderError, "exactly dtype"),
        (_raw_file({"__metadata__": {"k": 1}}), HeaderError, "__metadata__"),
        (_raw_file([1, 2]), HeaderError, "JSON object"),  # type: ignore[arg-type]
        (struct.pack("<Q", 8) + b"\xff\xfe{}    ", HeaderError, "UTF-8 JSON"),
        (struct.pack("<Q", 16) + b'{"a":1, "a":2}  ', HeaderError, "duplicate key"),
        (
            _raw_file({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]}}, b"abcd"),
            HeaderError,
            "needs",
        ),
    ],
)
def test_malformed_containers_are_refused(tmp_path, blob, error, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(error, match=message):
        read_header(path)
