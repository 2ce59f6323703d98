"""Strict reading and streaming writing of the safetensors container, in pure Python.

The header parser checks every offset (contiguity, bounds, sizes, no overflow) and needs no
torch, so the registry validates uploads with it; the writer streams tensor by tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import HeaderError, TruncatedFileError
from .files import AtomicWriter, check_output

#: The stock safetensors library refuses headers above this size; so do we.
MAX_HEADER_SIZE = 100_000_000

#: safetensors dtype code -> item size in bytes.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

if sys.byteorder != "little":  # the format is little-endian and we write native bytes
    raise ImportError("deltastore requires a little-endian machine")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's header record; offsets are absolute positions in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]
    data_start: int
    file_size: int


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise HeaderError(f"duplicate key {key!r} in safetensors header")
        out[key] = value
    return out


#: Offsets are unsigned 64-bit in the stock library; anything larger cannot be loaded by it.
U64_LIMIT = 2**64
#: Dimensions and element counts must fit a signed 64-bit integer: torch and numpy index with one,
#: so a file with a larger (even zero-size) shape would load with no framework.
DIM_LIMIT = 2**63


def _is_uint(value: object, limit: int = U64_LIMIT) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def strict_json_loads(text: str | bytes):
    """`json.loads` for untrusted headers: duplicate keys, NaN/Infinity, integers too long to
    convert and nesting too deep to parse are all a ValueError (never another exception)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _has_surrogate(value: str) -> bool:
    """A lone UTF-16 surrogate (from an unpaired `\\ud800`-style escape) is not Unicode; the stock
    library refuses it, so we do too."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _short(shape: list[int]) -> str:
    return str(shape) if len(shape) <= 8 else str(shape[:8])[:-1] + ", ...]"


def _numel_fits(shape: list[int], itemsize: int) -> bool:
    """The element count, multiplied left to right as the stock library does, stays below 2**63
    (a zero dimension after an overflowing product is still refused), and its bit size below 2**64."""
    n = 1
    for d in shape:
        n *= d
        if n >= DIM_LIMIT:
            return False
    return n * itemsize * 8 < U64_LIMIT


def parse_header_bytes(prefix: bytes, file_size: int) -> Header:
    """Parse and validate a safetensors header from the file's first bytes.

    `prefix` must hold at least the 8-byte length and the JSON header; `file_size` is the
    size of the whole file, against which every data offset is checked.
    """
    if file_size < 8 or len(prefix) < 8:
        raise TruncatedFileError(f"file is {file_size} bytes; a safetensors file needs at least 8")
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > MAX_HEADER_SIZE:
        raise HeaderError(f"header length {header_len} exceeds the {MAX_HEADER_SIZE}-byte limit")
    if 8 + header_len > file_size:
        raise TruncatedFileError(
            f"header claims {header_len} bytes but the file has only {file_size - 8} after the length"
        )
    if len(prefix) < 8 + header_len:
        raise TruncatedFileError("header is cut short")
    raw = prefix[8 : 8 + header_len]
    try:
        doc = strict_json_loads(raw.decode("utf-8"))
    except HeaderError:
        raise
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise HeaderError(f"header is not valid UTF-8 JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise HeaderError("header must be a JSON object")

    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HeaderError("__metadata__ must map strings to strings")
    if any(_has_surrogate(k) or _has_surrogate(v) for k, v in metadata.items()):
        raise HeaderError("__metadata__ holds a lone UTF-16 surrogate (not valid Unicode)")

    data_start = 8 + header_len
    data_size = file_size - data_start
    tensors: dict[str, TensorEntry] = {}
    for name, info in doc.items():
        if _has_surrogate(name):
            raise HeaderError(f"tensor name {name!r} holds a lone UTF-16 surrogate (not valid Unicode)")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise HeaderError(f"tensor {name!r}: unknown dtype {str(dtype)[:40]!r}")
        if not isinstance(shape, list) or not all(_is_uint(d, DIM_LIMIT) for d in shape):
            raise HeaderError(f"tensor {name!r}: shape must be a list of non-negative integers below 2**63")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_uint(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise HeaderError(
                f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end < 2**64"
            )
        # Multiplied left to right as the stock library does, stopping at 2**64 (so a forged
        # shape of millions of huge dimensions costs nothing); Python integers cannot overflow.
        if not _numel_fits(shape, DTYPE_SIZES[dtype]):
            raise HeaderError(
                f"tensor {name!r}: {dtype} shape needs more elements than a 64-bit size can count"
            )
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise HeaderError(
                f"tensor {name!r}: {dtype}{_short(shape)} needs {expected} bytes but offsets span "
                f"{offsets[1] - offsets[0]}"
            )
        tensors[name] = TensorEntry(
            name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1]
        )

    cursor = data_start
    for entry in sorted(tensors.values(), key=lambda e: (e.start, e.end)):
        if entry.start != cursor:
            raise HeaderError(
                f"tensor {entry.name!r}: data does not start where the previous tensor ends "
                "(overlapping or gapped offsets)"
            )
        cursor = entry.end
    if cursor > file_size:
        raise TruncatedFileError(
            f"tensor data needs {cursor - data_start} bytes but the file holds {data_size}"
        )
    if cursor != file_size:
        raise HeaderError(f"{file_size - cursor} unexpected trailing bytes after the tensor data")
    return Header(metadata=dict(metadata), tensors=tensors, data_start=data_start, file_size=file_size)


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of the safetensors file at `path`."""
    with open(path, "rb") as fh:
        return read_header_from(fh, os.fstat(fh.fileno()).st_size)


def read_header_from(fh: IO[bytes], file_size: int) -> Header:
    first = fh.read(8)
    if len(first) < 8:
        raise TruncatedFileError(f"file is {len(first)} bytes; a safetensors file needs at least 8")
    (header_len,) = struct.unpack("<Q", first)
    if header_len > MAX_HEADER_SIZE:
        raise HeaderError(f"header length {header_len} exceeds the {MAX_HEADER_SIZE}-byte limit")
    if 8 + header_len > file_size:
        raise TruncatedFileError(
            f"header claims {header_len} bytes but the file has only {file_size - 8} after the length"
        )
    return parse_header_bytes(first + fh.read(header_len), file_size)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def encode_header(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length plus JSON header for tensors laid out in the given order.

    The JSON is padded with spaces to a multiple of 8 bytes, as the stock library does, so
    tensor data stays aligned for memory mapping.
    """
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        if spec.name in doc:
            raise ValueError(f"duplicate tensor name {spec.name!r}")
        doc[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_SIZE:
        raise HeaderError(f"header would be {len(raw)} bytes, above the {MAX_HEADER_SIZE}-byte limit")
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Writes a safetensors file whose tensor list is known up front, one tensor at a time.

    Data goes to a fresh temp file beside `path` (codec.files.AtomicWriter); `close()` fsyncs and
    renames it into place, so a reader never sees a half-written file. `inputs` are paths the
    output must not overwrite or lie in. Tensors must be written in the order of `specs`.

        with SafetensorsWriter(path, specs, metadata) as w:
            for spec in specs:
                w.write(spec.name, buffer_of(spec.name))
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: list[TensorSpec],
        metadata: Mapping[str, str] | None = None,
        *,
        inputs: Iterable[str | os.PathLike[str]] = (),
    ):
        self.path = Path(path)
        self._specs = list(specs)
        self._next = 0
        header = encode_header(self._specs, metadata)
        self._out: AtomicWriter | None = AtomicWriter(self.path, inputs=inputs)
        self._fh: IO[bytes] | None = self._out.file
        try:
            self._fh.write(header)
        except BaseException:
            self.abort()
            raise

    def write_parts(self, name: str, parts: Iterable[memoryview | bytes]) -> None:
        """Write one tensor given as consecutive pieces (e.g. row blocks as they are computed)."""
        assert self._fh is not None, "writer is closed"
        if self._next >= len(self._specs) or self._specs[self._next].name != name:
            expected = self._specs[self._next].name if self._next < len(self._specs) else None
            raise ValueError(f"tensor {name!r} written out of order (expected {expected!r})")
        total = 0
        for part in parts:
            mv = memoryview(part).cast("B")
            total += mv.nbytes
            if total > self._specs[self._next].nbytes:
                raise ValueError(
                    f"tensor {name!r}: more bytes than the header's {self._specs[self._next].nbytes}"
                )
            self._fh.write(mv)
        if total != self._specs[self._next].nbytes:
            raise ValueError(
                f"tensor {name!r}: got {total} bytes, header says {self._specs[self._next].nbytes}"
            )
        self._next += 1

    def write(self, name: str, data: memoryview | bytes) -> None:
        self.write_parts(name, (data,))

    def write_rest_from(self, src: IO[bytes], chunk: int = 16 << 20) -> None:
        """Copy the data of all not-yet-written tensors, in spec order, from a file object."""
        assert self._fh is not None, "writer is closed"
        remaining = sum(s.nbytes for s in self._specs[self._next :])
        while remaining:
            buf = src.read(min(chunk, remaining))
            if not buf:
                raise ValueError(f"source ended {remaining} bytes early")
            self._fh.write(buf)
            remaining -= len(buf)
        self._next = len(self._specs)

    def close(self) -> None:
        if self._fh is None:
            return
        if self._next != len(self._specs):
            self.abort()
            raise ValueError(f"only {self._next} of {len(self._specs)} tensors were written")
        out, self._out, self._fh = self._out, None, None
        out.commit()

    def abort(self) -> None:
        if self._out is not None:
            self._out.abort()
        self._out = self._fh = None

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SpooledSafetensorsWriter:
    """Writes a safetensors file whose tensor list is discovered as it goes.

    Tensor bytes are appended to an anonymous spool file; `close(metadata)` writes the header
    and copies the spool behind it. Used where deciding what to store needs the data first
    (compression skips unchanged tensors).
    """

    def __init__(self, path: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str]] = ()):
        self.inputs = list(inputs)
        self.path = check_output(path, self.inputs)  # refused before any work, checked again at close
        self._specs: list[TensorSpec] = []
        self._spool = tempfile.TemporaryFile(dir=self.path.parent, prefix=".spool-")

    def add(self, spec: TensorSpec, data: memoryview | bytes) -> None:
        mv = memoryview(data).cast("B")
        if mv.nbytes != spec.nbytes:
            raise ValueError(f"tensor {spec.name!r}: got {mv.nbytes} bytes, spec says {spec.nbytes}")
        self._spool.write(mv)
        self._specs.append(spec)

    @property
    def specs(self) -> list[TensorSpec]:
        return list(self._specs)

    def close(self, metadata: Mapping[str, str]) -> None:
        self._spool.flush()
        self._spool.seek(0)
        with SafetensorsWriter(self.path, self._specs, metadata, inputs=self.inputs) as writer:
            writer.write_rest_from(self._spool)
        self._spool.close()

    def abort(self) -> None:
        self._spool.close()
