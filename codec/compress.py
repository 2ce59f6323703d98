"""Compress a fine-tuned checkpoint against its base into a format-v1 BitDelta file.

Streams tensor by tensor (memory-mapped inputs), so peak memory is a few tensors, not a model.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from . import __version__, deltadq
from .activations import InputMoments
from .background import OrderedWorker
from .bitdelta import binarize
from .checkpoint import FINGERPRINT_PREFIX, TORCH_TO_ST, Checkpoint, _fingerprint_record, tensor_bytes
from .container import SpooledSafetensorsWriter, TensorSpec
from .errors import CodecError, IncompatibleDeltaError, NothingToCompressError
from .format import DQ_MASK, DTYPE_CODE, FLOAT_CODES, FORMAT, FORMAT_VERSION, is_registry_base_name

ScaleMode = Literal["per-matrix", "per-row"]
Progress = Callable[[str, int, int], None]

#: Tensors kept dense by default, as in BitDelta: embeddings and the LM head (and any 1-D tensor).
DEFAULT_DENSE_PATTERNS = (
    "*embed_tokens*",
    "*lm_head*",
    "*wte*",
    "*wpe*",
    "*embed_in*",
    "*embed_out*",
    "*word_embeddings*",
    "*position_embeddings*",
    "*output.weight",
)
MAX_PLANES = 8


@dataclass(frozen=True)
class CompressOptions:
    """How to compress. `include` patterns force binarization (e.g. `*embed_tokens*`), `exclude`
    patterns keep tensors dense; both are fnmatch globs over tensor names."""

    planes: int = 1
    scale_mode: ScaleMode = "per-matrix"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    base_name: str | None = None
    codec: Literal["bitdelta", "deltadq"] = "bitdelta"
    # deltadq only (docs/deltadq.md): a target ratio vs fp16, or explicit bits + keep ratio;
    # group_size None = "auto" (searched per tensor).
    dq_ratio: float | None = None
    dq_bits: int | None = None
    dq_keep: float | None = None
    dq_group_size: int | None = None
    dq_parts: int = 1
    dq_seed: int = 0
    #: Write a delta even when no tensor can be compressed because every shape differs from the
    #: base's (the delta is then the fine-tune stored dense).
    allow_dense: bool = False

    def __post_init__(self) -> None:
        if self.codec not in ("bitdelta", "deltadq"):
            raise CodecError(f"codec must be 'bitdelta' or 'deltadq', got {self.codec!r}")
        if self.codec == "deltadq":
            self._check_deltadq()
        if not 1 <= self.planes <= MAX_PLANES:
            raise CodecError(f"bits/planes must be between 1 and {MAX_PLANES}, got {self.planes}")
        if self.scale_mode not in ("per-matrix", "per-row"):
            raise CodecError(f"scale mode must be 'per-matrix' or 'per-row', got {self.scale_mode!r}")

    def _check_deltadq(self) -> None:
        if self.dq_ratio is None and (self.dq_bits is None or self.dq_keep is None):
            raise CodecError("deltadq needs --ratio, or both --dq-bits and --keep")
        if self.dq_ratio is not None and (self.dq_bits is not None or self.dq_keep is not None):
            raise CodecError("give either --ratio or --dq-bits/--keep, not both")
        if self.dq_ratio is not None and not 16 <= self.dq_ratio <= 16384:
            raise CodecError(f"ratio must be between 16 and 16384, got {self.dq_ratio}")
        if self.dq_keep is not None and not 0 < self.dq_keep <= 1:
            raise CodecError(f"keep ratio must be in (0, 1], got {self.dq_keep}")
        if self.dq_bits is not None and not 1 <= self.dq_bits <= 8:
            raise CodecError(f"deltadq bits must be between 1 and 8, got {self.dq_bits}")
        if self.dq_group_size is not None and self.dq_group_size < 1:
            raise CodecError(f"group size must be >= 1 (or auto), got {self.dq_group_size}")
        if (
            self.dq_group_size is not None
            and self.dq_keep is not None
            and self.dq_group_size * self.dq_keep < 1
        ):
            raise CodecError(
                f"group size {self.dq_group_size} × keep {self.dq_keep} keeps nothing: use a larger group"
            )
        if self.dq_parts < 1 or (self.dq_bits is not None and self.dq_bits % self.dq_parts):
            raise CodecError(f"parts must be >= 1 and divide the bits, got {self.dq_parts}")
        if not 0 <= self.dq_seed < 2**64:
            raise CodecError("seed must be in [0, 2^64)")

    def binarizes(self, name: str, shape: Sequence[int], dtype: str) -> bool:
        """Whether tensor `name` is stored as sign planes (vs. dense) when it changed."""
        if len(shape) != 2 or dtype not in FLOAT_CODES or 0 in shape:
            return False
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return False
        if any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return True
        return name.endswith(".weight") and not any(
            fnmatch.fnmatchcase(name, p) for p in DEFAULT_DENSE_PATTERNS
        )


@dataclass
class CompressReport:
    path: Path
    base_fingerprint: str
    binarized: list[str] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    finetuned_bytes: int = 0
    delta_bytes: int = 0

    @property
    def ratio(self) -> float:
        return self.finetuned_bytes / self.delta_bytes if self.delta_bytes else float("inf")


def _model_dtype(ft: Checkpoint, options: CompressOptions) -> str:
    """The dtype of the fine-tune's binarizable weights (by bytes); binarized tensors decode to it."""
    counts: Counter[str] = Counter()
    for name in ft.names:
        e = ft.entry(name)
        if options.binarizes(name, e.shape, e.dtype):
            counts[e.dtype] += e.nbytes
    if not counts:
        counts.update(
            {ft.entry(n).dtype: ft.entry(n).nbytes for n in ft.names if ft.entry(n).dtype in FLOAT_CODES}
        )
    if not counts:
        raise CodecError("the fine-tuned checkpoint has no floating-point tensors")
    code = counts.most_common(1)[0][0]
    return {v: k for k, v in DTYPE_CODE.items()}[code]


def _check_names(base: Checkpoint, ft: Checkpoint) -> None:
    extra = [n for n in ft.names if n not in base]
    if extra:
        raise IncompatibleDeltaError(
            f"the fine-tune has {len(extra)} tensor(s) the base lacks (e.g. {extra[0]!r}); "
            "a delta can only change tensors of its base"
        )
    missing = [
        n for n in base.names if n not in ft and not (n.endswith("lm_head.weight") and ft.tied_embeddings)
    ]
    if missing:
        raise IncompatibleDeltaError(
            f"the fine-tune lacks {len(missing)} tensor(s) of the base (e.g. {missing[0]!r})"
        )


def _check_some_tensor_compresses(base: Checkpoint, ft: Checkpoint, options: CompressOptions) -> None:
    """A fine-tune none of whose compressible tensors has its base tensor's shape was made from
    another model: refuse it (from the headers alone) rather than store it all dense."""
    candidates = [n for n in ft.names if options.binarizes(n, ft.entry(n).shape, ft.entry(n).dtype)]
    mismatched = [n for n in candidates if ft.entry(n).shape != base.entry(n).shape]
    if candidates and len(mismatched) == len(candidates):
        first = mismatched[0]
        raise NothingToCompressError(
            f"no tensor can be compressed: every weight's shape differs from the base's (first: {first} is "
            f"{list(ft.entry(first).shape)} in the fine-tune, {list(base.entry(first).shape)} in the base); "
            "is this the fine-tune's base model?"
        )


def compress(
    base_path: str | os.PathLike[str],
    finetuned_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    options: CompressOptions = CompressOptions(),
    *,
    progress: Progress | None = None,
    extra_metadata: dict[str, str] | None = None,
    input_moments: InputMoments | None = None,
) -> CompressReport:
    """Write the BitDelta of `finetuned_path` against `base_path` to `out_path` (atomically)."""
    base = Checkpoint.open(base_path)
    ft = Checkpoint.open(finetuned_path)
    _check_names(base, ft)
    if not options.allow_dense:
        _check_some_tensor_compresses(base, ft, options)
    dtype_name = _model_dtype(ft, options)
    model_code = DTYPE_CODE[dtype_name]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    fp = hashlib.sha256(FINGERPRINT_PREFIX)
    # The output may be neither input nor inside an input model directory (refused before any work).
    writer = SpooledSafetensorsWriter(out_path, inputs=[base_path, finetuned_path])
    report = CompressReport(path=out_path, base_fingerprint="", finetuned_bytes=ft.total_bytes)
    names = sorted(base.names)  # sorted order lets the base fingerprint be hashed in the same pass
    io = OrderedWorker()  # hashes the base fingerprint while the next tensor is binarized
    try:
        for i, name in enumerate(names):
            if progress:
                progress(name, i, len(names))
            b = base.get(name)
            be = base.entry(name)
            io.submit(functools.partial(_hash_tensor, fp, name, be.dtype, be.shape, b))
            if name not in ft:  # tied alias of the embeddings: follows them
                report.unchanged.append(name)
                continue
            f = ft.get(name)
            fe = ft.entry(name)
            same_layout = fe.shape == be.shape and fe.dtype == be.dtype
            if (
                fe.shape == be.shape
                and fe.dtype == model_code
                and options.binarizes(name, fe.shape, fe.dtype)
            ):
                if options.codec == "deltadq":
                    params = deltadq.choose(
                        f,
                        b,
                        name,
                        options.dq_seed,
                        ratio=options.dq_ratio,
                        bits=options.dq_bits,
                        keep_ratio=options.dq_keep,
                        group_size=options.dq_group_size,
                        parts=options.dq_parts,
                        channel_weight=input_moments.weight_for(name, fe.shape[-1])
                        if input_moments
                        else None,
                    )
                    codes, step = deltadq.encode(f, b, name, options.dq_seed, params)
                    pieces = [
                        (".dq_codes", "U8", codes),
                        (".dq_step", "F32", step),
                        (
                            ".dq_params",
                            "I32",
                            torch.tensor([params.group_size, params.keep, params.bits], dtype=torch.int32),
                        ),
                    ]
                    zero = not bool(step.any())
                else:
                    sign, scale = binarize(f, b, options.planes, options.scale_mode)
                    pieces = [(".sign", "U8", sign), (".scale", "F32", scale)]
                    zero = not bool(scale.any())  # every plane's scale is 0: the delta is all zeros
                if same_layout and zero:
                    report.unchanged.append(name)
                    continue
                for suffix, code, tensor in pieces:
                    io.submit(
                        functools.partial(
                            writer.add,
                            TensorSpec(name + suffix, code, tuple(tensor.shape)),
                            tensor_bytes(tensor),
                        )
                    )
                report.binarized.append(name)
            elif same_layout and torch.equal(f, b):
                report.unchanged.append(name)
            else:
                io.submit(
                    functools.partial(
                        writer.add,
                        TensorSpec(name + ".full", TORCH_TO_ST[f.dtype], tuple(f.shape)),
                        tensor_bytes(f),
                    )
                )
                report.dense.append(name)
        io.join()
        report.base_fingerprint = "sha256:" + fp.hexdigest()
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "codec": options.codec,
            "base_model": options.base_name or _default_base_name(base),
            "base_fingerprint": report.base_fingerprint,
            "dtype": dtype_name,
            "created_with": f"deltastore {__version__}",
            "x-finetuned-bytes": str(ft.total_bytes),
        }
        if options.codec == "bitdelta":
            metadata.update({"x-planes": str(options.planes), "x-scale": options.scale_mode})
        else:
            metadata["deltadq"] = json.dumps(
                {
                    "seed": options.dq_seed,
                    "mask": DQ_MASK,
                    "ratio": options.dq_ratio,
                    "bits": options.dq_bits,
                    "keep": options.dq_keep,
                    "group_size": options.dq_group_size or "auto",
                    "parts": options.dq_parts,
                    "search": (
                        {
                            "error": "output, weighted by calibration E[x^2]",
                            "tokens": input_moments.tokens,
                            "data_fingerprint": input_moments.data_fingerprint,
                        }
                        if input_moments
                        else {"error": "weights (isotropic inputs)"}
                    ),
                },
                sort_keys=True,
            )
        if base.source is not None:
            metadata["x-base-source"] = base.source.to_json()
        if ft.source is not None:
            metadata["x-finetuned-source"] = ft.source.to_json()
        if ft.config is not None:
            metadata["x-hf-config"] = json.dumps(ft.config, sort_keys=True)
        metadata.update(extra_metadata or {})
        writer.close(metadata)
    except BaseException:
        io.abandon()
        writer.abort()
        raise
    report.delta_bytes = out_path.stat().st_size
    return report


def _hash_tensor(fp, name: str, dtype: str, shape, tensor: torch.Tensor) -> None:
    fp.update(_fingerprint_record(name, dtype, shape))
    fp.update(tensor_bytes(tensor))


def registry_base_name(base: Checkpoint) -> str | None:
    """The registry name a base checkpoint records for itself: the Hub repo id it was resolved
    from, else config.json's `_name_or_path`, when it is a valid `org/model`; else None."""
    if base.source is not None and is_registry_base_name(base.source.repo_id):
        return base.source.repo_id
    name = (base.config or {}).get("_name_or_path")
    return name if is_registry_base_name(name) else None


def _default_base_name(base: Checkpoint) -> str:
    # Callers that need a registry name check `registry_base_name` first (the CLI refuses
    # without one); the directory name only labels a delta made for local use.
    return registry_base_name(base) or base.root.name.removesuffix(".safetensors")
