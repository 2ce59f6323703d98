"""The delta file format, version 1 (docs/format.md): metadata keys, tensor naming, and the
reader that validates a `.bdelta` file completely before anything uses it.

This module needs no torch (the registry validates uploads with it); tensor accessors import
torch lazily.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import codecs
from .container import Header, TensorEntry, parse_header_bytes, read_header, strict_json_loads
from .errors import (
    BaseMismatchError,
    CorruptFileError,
    HeaderError,
    IncompatibleDeltaError,
    InvalidDeltaError,
    NotSafetensorsError,
    TruncatedFileError,
    UnsupportedFormatError,
)
from .files import sha256_fileobj

if TYPE_CHECKING:
    import torch

FORMAT = "deltastore.delta"
FORMAT_VERSION = "1"
#: The codecs built in (codec/codecs/); a file may name any registered one (`codecs.names()`).
KNOWN_CODECS = frozenset(codecs.names())
FILE_SUFFIX = ".bdelta"
REQUIRED_KEYS = ("format", "format_version", "codec", "base_model", "base_fingerprint", "dtype")
DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
DTYPE_CODE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}
FLOAT_CODES = frozenset(DTYPE_CODE.values())
FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
#: One segment of a registry base-model name `org/model` (the upstream spelling, `meta-llama/Llama-3.1-8B`).
BASE_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def is_registry_base_name(name: object) -> bool:
    """Whether `name` is a valid registry base name `org/model` (what `base_model` should hold)."""
    parts = name.split("/") if isinstance(name, str) else []
    return len(parts) == 2 and all(BASE_SEGMENT_RE.fullmatch(p) for p in parts)


#: What the byte after a safetensors file's 8-byte length can be: its JSON header's '{' or whitespace.
_JSON_STARTS = frozenset({b"{", b" ", b"\t", b"\n", b"\r"})
_MAX_SCALE_BYTES = 1 << 30  # scales are F32 [P, out]: a GiB of them is a forged file


@dataclass(frozen=True)
class DeltaEntry:
    """What the delta stores for one base tensor: the full tensor (`kind` "full"), or the parts
    of its codec's encoding (`kind` the codec's name), by tensor kind (`N.<kind>` suffix)."""

    name: str
    kind: str
    parts: Mapping[str, TensorEntry]

    def part(self, kind: str) -> TensorEntry | None:
        return self.parts.get(kind)

    # Named parts of the built-in codecs, as the loader reads them.
    @property
    def full(self) -> TensorEntry | None:
        return self.parts.get("full")

    @property
    def sign(self) -> TensorEntry | None:
        return self.parts.get("sign")

    @property
    def scale(self) -> TensorEntry | None:
        return self.parts.get("scale")

    @property
    def dq_codes(self) -> TensorEntry | None:  # deltadq: U8 [parts, out, packed]
        return self.parts.get("dq_codes")

    @property
    def dq_step(self) -> TensorEntry | None:  # deltadq: F32 [out]
        return self.parts.get("dq_step")

    @property
    def dq_params(self) -> TensorEntry | None:  # deltadq: I32 [3] = group_size, keep, bits
        return self.parts.get("dq_params")

    @property
    def planes(self) -> int:
        return self.sign.shape[0] if self.sign is not None else 0

    @property
    def per_row(self) -> bool:
        return self.scale is not None and self.scale.shape[1] != 1

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.parts.values())


def split_name(tensor_name: str) -> tuple[str, str]:
    """`model.x.weight.sign` -> (`model.x.weight`, `sign`)."""
    base, dot, kind = tensor_name.rpartition(".")
    kinds = codecs.kinds()
    if not dot or kind not in kinds or not base:
        raise InvalidDeltaError(
            f"tensor {tensor_name!r}: name must end in one of "
            f".{', .'.join(kinds)} (format version {FORMAT_VERSION})"
        )
    return base, kind


def _show(value: object) -> str:
    """A value from an untrusted header, quoted and cut short for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_metadata(metadata: Mapping[str, str]) -> None:
    """Check the required `__metadata__` keys of a format-v1 delta."""
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if missing:
        if "format" in missing:
            raise UnsupportedFormatError("not a deltastore delta: metadata has no 'format' key")
        raise InvalidDeltaError(f"metadata is missing required key(s): {', '.join(missing)}")
    if metadata["format"] != FORMAT:
        raise UnsupportedFormatError(f"format is {_show(metadata['format'])}, expected {FORMAT!r}")
    if metadata["format_version"] != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"format_version {_show(metadata['format_version'])} is "
            f"not supported (this reader knows {FORMAT_VERSION!r}); "
            "upgrade deltastore"
        )
    if metadata["codec"] not in codecs.CODECS:
        raise UnsupportedFormatError(
            f"unknown codec {_show(metadata['codec'])} (known: {', '.join(codecs.names())})"
        )
    if not metadata["base_model"].strip():
        raise InvalidDeltaError("metadata 'base_model' is empty")
    if not FINGERPRINT_RE.match(metadata["base_fingerprint"]):
        raise InvalidDeltaError(
            f"metadata 'base_fingerprint' {_show(metadata['base_fingerprint'])} is not sha256:<64 hex>"
        )
    if metadata["dtype"] not in DTYPE_NAMES:
        raise InvalidDeltaError(
            f"metadata 'dtype' {_show(metadata['dtype'])} is not one of {', '.join(DTYPE_NAMES)}"
        )
    codecs.get(metadata["codec"]).validate_metadata(metadata)
    for key in ("calibration", "fidelity", "x-hf-config"):
        if key in metadata:
            try:
                strict_json_loads(metadata[key])
            except ValueError:
                raise InvalidDeltaError(f"metadata {key!r} is not valid JSON") from None


def group_entries(header: Header) -> dict[str, DeltaEntry]:
    """Group tensors by base name and check each group's kinds, dtypes and ranks (the file's
    codec checks its own parts)."""
    codec = codecs.get(header.metadata.get("codec", "bitdelta"))
    parts: dict[str, dict[str, TensorEntry]] = {}
    for tname, entry in header.tensors.items():
        base, kind = split_name(tname)
        parts.setdefault(base, {})[kind] = entry
    out: dict[str, DeltaEntry] = {}
    for name, p in parts.items():
        if "full" in p:
            if len(p) > 1:
                raise InvalidDeltaError(
                    f"{name}: has both .full and other parts ({', '.join(sorted(set(p) - {'full'}))})"
                )
            out[name] = DeltaEntry(name, "full", p)
            continue
        stray = [k for k in codecs.kinds() if k in p and k not in codec.kinds]
        if stray:
            raise InvalidDeltaError(f"{name}: .{'/.'.join(stray)} tensors in a {codec.name!r} delta")
        codec.check_parts(name, p)
        out[name] = DeltaEntry(name, codec.name, p)
    return out


_NUMPY_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
}
_NUMPY_DTYPES |= {"U8": "u1", "BOOL": "?"}


def _check_tensor_values(fh, entries: Mapping[str, DeltaEntry]) -> dict[str, object]:
    """Side values (scales, steps) must be finite, and each codec reads and validates its
    per-tensor parameters. Returns those parameters by tensor (absent where a codec has none)."""

    def read(entry: TensorEntry) -> np.ndarray:
        fh.seek(entry.start)
        return np.frombuffer(fh.read(entry.nbytes), dtype=_NUMPY_DTYPES.get(entry.dtype, "u1"))

    total = 0
    info: dict[str, object] = {}
    for e in entries.values():
        if e.kind == "full":
            continue
        codec = codecs.get(e.kind)
        for label in codec.finite_kinds:
            part = e.part(label)
            total += part.nbytes
            if total > _MAX_SCALE_BYTES:
                raise InvalidDeltaError("scale tensors are implausibly large")
            if not np.isfinite(read(part)).all():
                raise InvalidDeltaError(f"{e.name}.{label} contains NaN or Inf")
        value = codec.read_info(e, read)
        if value is not None:
            info[e.name] = value
    return info


def _check_digest(fh, path: Path, expected: str) -> None:
    actual = sha256_fileobj(fh)
    fh.seek(0)
    if actual != expected:
        raise CorruptFileError(
            f"{path}: content has sha256 {actual}, but {expected} was "
            "recorded for it (corrupted or replaced; fetch it again)"
        )


class DeltaFile:
    """A validated format-v1 delta on disk.

    delta = DeltaFile.open("math.bdelta")     # raises InvalidDeltaError subclasses
    delta.check_base(base_specs, fingerprint)  # raises BaseMismatchError / IncompatibleDeltaError
    sign, scale = delta.sign(name), delta.scale(name)
    """

    def __init__(self, path: Path, header: Header, entries: dict[str, DeltaEntry], info: dict | None = None):
        self.path = path
        self.header = header
        self.entries = entries
        self._info = info or {}
        self._handle = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, expected_digest: str | None = None) -> DeltaFile:
        """Validate and open a delta. With `expected_digest` (`sha256:<hex>` of the file, as the
        registry records it), the whole file is hashed first and a mismatch (a cached copy
        corrupted or replaced) raises CorruptFileError before any byte of it is interpreted."""
        path = Path(path)
        try:
            fh = open(path, "rb")
        except OSError as exc:
            raise InvalidDeltaError(f"{path}: cannot open: {exc.strerror or exc}") from None
        with fh:
            if expected_digest is not None:
                _check_digest(fh, path, expected_digest)
            size = os.fstat(fh.fileno()).st_size
            try:
                header = read_header_from_delta(fh, size)
            except (HeaderError, TruncatedFileError):
                fh.seek(8)
                if size > 8 and fh.read(1) not in _JSON_STARTS:  # not even the start of a safetensors header
                    raise NotSafetensorsError(
                        f"{path} is not a deltastore delta (not a safetensors file)"
                    ) from None
                raise
            entries = group_entries(header)
            info = _check_tensor_values(fh, entries)
        return cls(path, header, entries, info)

    def close(self) -> None:
        """Release the memory map (tensors already returned stay valid)."""
        self._handle = None

    def __enter__(self) -> DeltaFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    @property
    def base_model(self) -> str:
        return self.metadata["base_model"]

    @property
    def base_fingerprint(self) -> str:
        return self.metadata["base_fingerprint"]

    @property
    def dtype_name(self) -> str:
        return self.metadata["dtype"]

    @property
    def codec(self) -> str:
        return self.metadata["codec"]

    def tensor_info(self, name: str):
        """The per-tensor parameters the codec read from the file (`Codec.read_info`), or None."""
        return self._info.get(name)

    @property
    def dq_seed(self) -> int:
        return int(json.loads(self.metadata["deltadq"])["seed"])

    def dq_params(self, name: str):
        """The `codec.deltadq.DQParams` of a deltadq tensor."""
        return self._info[name]

    # --- compatibility with a base ---------------------------------------------------------
    def check_base(
        self,
        base_specs: Mapping[str, tuple[str, tuple[int, ...]]],
        fingerprint: str | None,
        *,
        force: bool = False,
    ) -> None:
        """Refuse, before anything is written, a delta that does not fit this base.

        `base_specs` maps base tensor names to (safetensors dtype, shape); `fingerprint` is the
        base's fingerprint (None skips that check, as `force` does).
        """
        if fingerprint is not None and fingerprint != self.base_fingerprint and not force:
            raise BaseMismatchError(
                f"delta was made for base {self.base_model!r} with fingerprint {self.base_fingerprint}, "
                f"but the given base has fingerprint {fingerprint}",
                expected=self.base_fingerprint,
                actual=fingerprint,
            )
        for name, e in self.entries.items():
            if name not in base_specs:
                raise IncompatibleDeltaError(f"delta has tensor {name!r} that the base does not have")
            base_dtype, shape = base_specs[name]
            if e.full is not None:
                both_float = e.full.dtype in FLOAT_CODES and base_dtype in FLOAT_CODES
                if e.full.dtype != base_dtype and not both_float:
                    raise IncompatibleDeltaError(
                        f"{name}.full has dtype {e.full.dtype} but the base tensor is {base_dtype}"
                    )
                continue
            codec = codecs.get(e.kind)
            if base_dtype not in FLOAT_CODES:
                raise IncompatibleDeltaError(f"{name}: cannot add a {e.kind} delta to a {base_dtype} tensor")
            if len(shape) != 2:
                raise IncompatibleDeltaError(
                    f"{name}: .{codec.primary_kind} needs a 2-D base tensor, base has shape {list(shape)}"
                )
            for part, expected in codec.expected_shapes(e, self.tensor_info(name), tuple(shape)).items():
                got = list(e.part(part).shape)
                if got != expected:
                    raise IncompatibleDeltaError(
                        f"{name}.{part} has shape {got} but base shape {list(shape)} needs {expected}"
                    )

    # --- tensors ---------------------------------------------------------------------------
    def tensor(self, key: str) -> torch.Tensor:
        """A stored tensor by its full name (e.g. `N.sign`), memory-mapped."""
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.path), framework="pt")
        return self._handle.get_tensor(key)

    def sign(self, name: str) -> torch.Tensor:
        return self.tensor(name + ".sign")

    def scale(self, name: str) -> torch.Tensor:
        return self.tensor(name + ".scale")

    def full(self, name: str) -> torch.Tensor:
        return self.tensor(name + ".full")

    def dq_codes(self, name: str) -> torch.Tensor:
        return self.tensor(name + ".dq_codes")

    def dq_step(self, name: str) -> torch.Tensor:
        return self.tensor(name + ".dq_step")


def read_header_from_delta(fh, size: int) -> Header:
    """Parse the container header and the format-v1 metadata; raises InvalidDeltaError subclasses."""
    from .container import read_header_from

    header = read_header_from(fh, size)
    validate_metadata(header.metadata)
    return header


def validate_delta_header(prefix: bytes, file_size: int) -> tuple[Header, dict[str, DeltaEntry]]:
    """Validate a delta from its first bytes alone (header-only check for servers)."""
    header = parse_header_bytes(prefix, file_size)
    validate_metadata(header.metadata)
    return header, group_entries(header)


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "KNOWN_CODECS",
    "FILE_SUFFIX",
    "DeltaEntry",
    "DeltaFile",
    "validate_metadata",
    "validate_delta_header",
    "group_entries",
    "read_header",
]
