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

from .container import Header, TensorEntry, parse_header_bytes, read_header, strict_json_loads
from .deltadq_params import DQParams
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
KNOWN_CODECS = frozenset({"bitdelta", "deltadq"})
FILE_SUFFIX = ".bdelta"
REQUIRED_KEYS = ("format", "format_version", "codec", "base_model", "base_fingerprint", "dtype")
DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
DTYPE_CODE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}
FLOAT_CODES = frozenset(DTYPE_CODE.values())
KINDS = ("sign", "scale", "full", "dq_codes", "dq_step", "dq_params")
DQ_MASK = "splitmix64-v1"
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
    """What the delta stores for one base tensor: packed signs + scales, or the full tensor."""

    name: str
    sign: TensorEntry | None = None
    scale: TensorEntry | None = None
    full: TensorEntry | None = None
    dq_codes: TensorEntry | None = None  # deltadq: U8 [parts, out, packed]
    dq_step: TensorEntry | None = None  # deltadq: F32 [out]
    dq_params: TensorEntry | None = None  # deltadq: I32 [3] = group_size, keep, bits

    @property
    def kind(self) -> str:
        if self.full is not None:
            return "full"
        return "deltadq" if self.dq_codes is not None else "bitdelta"

    @property
    def planes(self) -> int:
        return self.sign.shape[0] if self.sign is not None else 0

    @property
    def per_row(self) -> bool:
        return self.scale is not None and self.scale.shape[1] != 1

    @property
    def nbytes(self) -> int:
        return sum(
            e.nbytes
            for e in (self.sign, self.scale, self.full, self.dq_codes, self.dq_step, self.dq_params)
            if e is not None
        )


def split_name(tensor_name: str) -> tuple[str, str]:
    """`model.x.weight.sign` -> (`model.x.weight`, `sign`)."""
    base, dot, kind = tensor_name.rpartition(".")
    if not dot or kind not in KINDS or not base:
        raise InvalidDeltaError(
            f"tensor {tensor_name!r}: name must end in one of "
            f".{', .'.join(KINDS)} (format version {FORMAT_VERSION})"
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
    if metadata["codec"] not in KNOWN_CODECS:
        raise UnsupportedFormatError(
            f"unknown codec {_show(metadata['codec'])} (known: {', '.join(sorted(KNOWN_CODECS))})"
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
    if metadata["codec"] == "deltadq":
        try:
            dq = strict_json_loads(metadata.get("deltadq", ""))
        except ValueError:
            raise InvalidDeltaError("codec 'deltadq' needs a 'deltadq' metadata key holding JSON") from None
        seed = dq.get("seed") if isinstance(dq, dict) else None
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise InvalidDeltaError("deltadq metadata needs an integer 'seed' in [0, 2^64)")
        if dq.get("mask") != DQ_MASK:
            raise UnsupportedFormatError(
                f"deltadq mask algorithm {_show(dq.get('mask'))} is not supported (known: {DQ_MASK!r})"
            )
    for key in ("calibration", "fidelity", "x-hf-config"):
        if key in metadata:
            try:
                strict_json_loads(metadata[key])
            except ValueError:
                raise InvalidDeltaError(f"metadata {key!r} is not valid JSON") from None


def group_entries(header: Header) -> dict[str, DeltaEntry]:
    """Group tensors by base name and check each group's kinds, dtypes and ranks."""
    codec = header.metadata.get("codec", "bitdelta")
    parts: dict[str, dict[str, TensorEntry]] = {}
    for tname, entry in header.tensors.items():
        base, kind = split_name(tname)
        parts.setdefault(base, {})[kind] = entry
    out: dict[str, DeltaEntry] = {}
    for name, p in parts.items():
        full = p.get("full")
        if full is not None:
            if len(p) > 1:
                raise InvalidDeltaError(
                    f"{name}: has both .full and other parts ({', '.join(sorted(set(p) - {'full'}))})"
                )
            out[name] = DeltaEntry(name, full=full)
        elif any(k.startswith("dq_") for k in p):
            out[name] = _dq_entry(name, p, codec)
        else:
            out[name] = _sign_entry(name, p, codec)
    return out


def _sign_entry(name: str, p: dict[str, TensorEntry], codec: str) -> DeltaEntry:
    sign, scale = p.get("sign"), p.get("scale")
    if codec != "bitdelta":
        raise InvalidDeltaError(f"{name}: .sign/.scale tensors in a {codec!r} delta")
    if sign is None:
        raise InvalidDeltaError(f"{name}: .scale without .sign")
    if scale is None:
        raise InvalidDeltaError(f"{name}: .sign has no matching .scale")
    if sign.dtype != "U8" or len(sign.shape) != 3 or sign.shape[0] < 1:
        raise InvalidDeltaError(
            f"{name}.sign must be U8 [P>=1, out, ceil(in/8)], got {sign.dtype}{list(sign.shape)}"
        )
    if scale.dtype != "F32" or len(scale.shape) != 2:
        raise InvalidDeltaError(
            f"{name}.scale must be F32 [P, 1] or [P, out], got {scale.dtype}{list(scale.shape)}"
        )
    planes, rows = sign.shape[0], sign.shape[1]
    if scale.shape[0] != planes or scale.shape[1] not in (1, rows):
        raise InvalidDeltaError(
            f"{name}.scale shape {list(scale.shape)} does not fit .sign {list(sign.shape)} "
            f"(expected [{planes}, 1] or [{planes}, {rows}])"
        )
    return DeltaEntry(name, sign=sign, scale=scale)


def _dq_entry(name: str, p: dict[str, TensorEntry], codec: str) -> DeltaEntry:
    if codec != "deltadq":
        raise InvalidDeltaError(f"{name}: .dq_* tensors in a {codec!r} delta")
    required = {"dq_codes", "dq_step", "dq_params"}
    if set(p) - required:
        raise InvalidDeltaError(
            f"{name}: deltadq tensor has unexpected part(s) .{', .'.join(sorted(set(p) - required))}"
        )
    if required - set(p):
        raise InvalidDeltaError(
            f"{name}: deltadq tensor needs .dq_codes, .dq_step and "
            f".dq_params (missing {', '.join(sorted(required - set(p)))})"
        )
    codes, step, params = p["dq_codes"], p["dq_step"], p["dq_params"]
    if codes.dtype != "U8" or len(codes.shape) != 3 or codes.shape[0] < 1:
        raise InvalidDeltaError(
            f"{name}.dq_codes must be U8 [parts>=1, out, packed], got {codes.dtype}{list(codes.shape)}"
        )
    if step.dtype != "F32" or list(step.shape) != [codes.shape[1]]:
        raise InvalidDeltaError(
            f"{name}.dq_step must be F32 [{codes.shape[1]}], got {step.dtype}{list(step.shape)}"
        )
    if params.dtype != "I32" or list(params.shape) != [3]:
        raise InvalidDeltaError(
            f"{name}.dq_params must be I32 [3] (group_size, "
            f"keep, bits), got {params.dtype}{list(params.shape)}"
        )
    return DeltaEntry(name, dq_codes=codes, dq_step=step, dq_params=params)


def _read_f32(fh, entry: TensorEntry) -> np.ndarray:
    fh.seek(entry.start)
    return np.frombuffer(fh.read(entry.nbytes), dtype="<f4")


def _check_tensor_values(fh, entries: Mapping[str, DeltaEntry]) -> dict[str, tuple[int, int, int, int]]:
    """Scales and steps must be finite; deltadq parameters must be valid. Returns the deltadq
    parameters (group_size, keep, bits, parts) per tensor."""
    from .errors import CodecError

    total = 0
    dq: dict[str, tuple[int, int, int, int]] = {}
    for e in entries.values():
        for part, label in ((e.scale, "scale"), (e.dq_step, "dq_step")):
            if part is None:
                continue
            total += part.nbytes
            if total > _MAX_SCALE_BYTES:
                raise InvalidDeltaError("scale tensors are implausibly large")
            if not np.isfinite(_read_f32(fh, part)).all():
                raise InvalidDeltaError(f"{e.name}.{label} contains NaN or Inf")
        if e.dq_params is not None:
            fh.seek(e.dq_params.start)
            group_size, keep, bits = (int(v) for v in np.frombuffer(fh.read(12), dtype="<i4"))
            parts = e.dq_codes.shape[0]
            try:
                DQParams(group_size, keep, bits, parts)
            except CodecError as exc:
                raise InvalidDeltaError(f"{e.name}.dq_params: {exc}") from None
            dq[e.name] = (group_size, keep, bits, parts)
    return dq


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

    def __init__(self, path: Path, header: Header, entries: dict[str, DeltaEntry], dq: dict | None = None):
        self.path = path
        self.header = header
        self.entries = entries
        self._dq = dq or {}
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
            dq = _check_tensor_values(fh, entries)
        return cls(path, header, entries, dq)

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

    @property
    def dq_seed(self) -> int:
        return int(json.loads(self.metadata["deltadq"])["seed"])

    def dq_params(self, name: str):
        """The `codec.deltadq.DQParams` of a deltadq tensor."""

        return DQParams(*self._dq[name])

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
            part = "sign" if e.sign is not None else "dq_codes"
            if base_dtype not in FLOAT_CODES:
                raise IncompatibleDeltaError(f"{name}: cannot add a {e.kind} delta to a {base_dtype} tensor")
            if len(shape) != 2:
                raise IncompatibleDeltaError(
                    f"{name}: .{part} needs a 2-D base tensor, base has shape {list(shape)}"
                )
            out, inn = shape
            if e.sign is not None:
                got, expected = list(e.sign.shape), [e.planes, out, (inn + 7) // 8]
            else:
                params = self.dq_params(name)
                got, expected = list(e.dq_codes.shape), [params.parts, out, params.packed_width(inn)]
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
