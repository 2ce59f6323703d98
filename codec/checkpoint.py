"""Read-only access to model checkpoints: a HF model directory (one or many safetensors
shards, with `model.safetensors.index.json`), a single `.safetensors` file, or a Hub model id
(`org/name[@revision]`, resolved through the Hub's local cache by codec.hub), tensor by tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .container import Header, TensorEntry, read_header
from .errors import CheckpointError, InvalidDeltaError
from .files import CHUNK
from .format import FORMAT as DELTA_FORMAT
from .hub import ModelSource, resolve_model

TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.int64: "I64",
    torch.float64: "F64",
}
ST_TO_TORCH: dict[str, torch.dtype] = {v: k for k, v in TORCH_TO_ST.items()}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
#: Names used in the file's `dtype` metadata key.
DTYPE_NAMES: dict[str, str] = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
DTYPE_CODES: dict[str, str] = {v: k for k, v in DTYPE_NAMES.items()}

FINGERPRINT_PREFIX = b"deltastore.fingerprint.v1\n"
_HASH_CHUNK = 8 * CHUNK  # reads of a fingerprint pass


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes, without a copy when it is already contiguous."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _fingerprint_record(name: str, dtype: str, shape: Iterable[int]) -> bytes:
    return json.dumps([name, dtype, list(shape)], separators=(",", ":")).encode("utf-8") + b"\n"


def fingerprint_tensors(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Fingerprint of in-memory tensors; equal to `Checkpoint.fingerprint()` of the same weights."""
    h = hashlib.sha256(FINGERPRINT_PREFIX)
    for name, t in sorted(items, key=lambda kv: kv[0]):
        if t.dtype not in TORCH_TO_ST:
            raise CheckpointError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        h.update(_fingerprint_record(name, TORCH_TO_ST[t.dtype], t.shape))
        h.update(tensor_bytes(t))
    return "sha256:" + h.hexdigest()


class Checkpoint:
    """A set of named tensors in one or more safetensors files, opened lazily (memory-mapped).

    ckpt = Checkpoint.open("path/to/model_dir")     # or a Hub id: "org/name@main"
    for name in ckpt.names: ckpt.get(name)
    """

    def __init__(
        self,
        root: Path,
        files: dict[str, Path],
        headers: dict[Path, Header],
        config: dict | None,
        source: ModelSource | None = None,
    ):
        self.root = root
        self.source = source  # the Hub repository and commit it was resolved from, None for a local path
        self._file_of = files  # tensor name -> file
        self._headers = headers
        self.config = config
        self._handles: dict[Path, object] = {}

    # --- construction -------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, revision: str | None = None) -> Checkpoint:
        """Open a local checkpoint, or a Hub model id (a local path of the same spelling wins)."""
        resolved = resolve_model(path, revision=revision)
        root = resolved.path
        if not root.exists():
            raise CheckpointError(f"{root}: no such file or directory")
        config = None
        if root.is_dir():
            cfg_path = root / "config.json"
            if cfg_path.is_file():
                try:
                    config = json.loads(cfg_path.read_text())
                except (OSError, ValueError) as exc:
                    raise CheckpointError(f"{cfg_path}: unreadable config: {exc}") from None
            index = root / "model.safetensors.index.json"
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                    shard_names = sorted(set(weight_map.values()))
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise CheckpointError(f"{index}: malformed index: {exc}") from None
                for shard in shard_names:
                    if Path(shard).name != shard:
                        raise CheckpointError(f"{index}: shard name {shard!r} is not a plain file name")
                files = [root / s for s in shard_names]
            else:
                files = sorted(root.glob("*.safetensors"))
            if not files:
                raise CheckpointError(
                    f"{root}: no *.safetensors weights (only safetensors checkpoints are supported; "
                    "convert .bin files with transformers' save_pretrained(safe_serialization=True))"
                )
        elif root.suffix == ".safetensors" or root.is_file():
            files = [root]
        else:
            raise CheckpointError(f"{root}: not a model directory or .safetensors file")

        file_of: dict[str, Path] = {}
        headers: dict[Path, Header] = {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in the index is missing")
            try:
                header = read_header(f)
            except InvalidDeltaError as exc:
                raise CheckpointError(f"{f}: not a valid safetensors file: {exc}") from None
            if header.metadata.get("format") == DELTA_FORMAT:  # a delta is never a checkpoint
                raise CheckpointError(f"{f} is a deltastore delta, not a model checkpoint")
            headers[f] = header
            for name in header.tensors:
                if name in file_of:
                    raise CheckpointError(
                        f"tensor {name!r} appears in both {file_of[name].name} and {f.name}"
                    )
                file_of[name] = f
        if not any(h.tensors[n].dtype in FLOAT_DTYPES for h in headers.values() for n in h.tensors):
            raise CheckpointError(f"{root} holds no model weights (no floating-point tensors)")
        return cls(root, file_of, headers, config, resolved.source)

    # --- queries --------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def entry(self, name: str) -> TensorEntry:
        return self._headers[self._file_of[name]].tensors[name]

    @property
    def files(self) -> list[Path]:
        return list(self._headers)

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (not counting headers)."""
        return sum(self.entry(n).nbytes for n in self._file_of)

    @property
    def file_bytes(self) -> int:
        return sum(h.file_size for h in self._headers.values())

    def get(self, name: str) -> torch.Tensor:
        """The tensor, memory-mapped where the platform allows (do not write into it)."""
        f = self._file_of[name]
        handle = self._handles.get(f)
        if handle is None:
            handle = self._handles[f] = safe_open(str(f), framework="pt")
        return handle.get_tensor(name)

    def raw_chunks(self, name: str, chunk: int = _HASH_CHUNK) -> Iterator[bytes]:
        entry = self.entry(name)
        with open(self._file_of[name], "rb") as fh:
            fh.seek(entry.start)
            remaining = entry.nbytes
            while remaining:
                buf = fh.read(min(chunk, remaining))
                if not buf:
                    raise CheckpointError(f"{self._file_of[name]}: file shrank while reading {name!r}")
                remaining -= len(buf)
                yield buf

    def fingerprint(self) -> str:
        """`sha256:<hex>` over names, dtypes, shapes and bytes in sorted-name order (docs/format.md)."""
        h = hashlib.sha256(FINGERPRINT_PREFIX)
        for name in sorted(self._file_of):
            entry = self.entry(name)
            h.update(_fingerprint_record(name, entry.dtype, entry.shape))
            for buf in self.raw_chunks(name):
                h.update(buf)
        return "sha256:" + h.hexdigest()

    @property
    def tied_embeddings(self) -> bool:
        cfg = self.config or {}
        return bool(
            cfg.get("tie_word_embeddings", cfg.get("text_config", {}).get("tie_word_embeddings", False))
        )
