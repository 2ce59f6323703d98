"""Compress a fine-tuned checkpoint against its base into a format-v1 delta file, with any codec
of codec/codecs/ (BitDelta by default).

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

import torch

from . import __version__, codecs
from .activations import InputMoments
from .background import OrderedWorker
from .checkpoint import (
    FINGERPRINT_PREFIX,
    ST_TO_TORCH,
    TORCH_TO_ST,
    Checkpoint,
    _fingerprint_record,
    tensor_bytes,
)
from .codecs.base import CodecOptions, EncodeContext, Encoding
from .codecs.bitdelta import MAX_PLANES, BitDeltaOptions, ScaleMode
from .codecs.deltadq import DeltaDQOptions
from .container import SpooledSafetensorsWriter, TensorSpec
from .errors import CodecError, IncompatibleDeltaError, NothingToCompressError
from .format import DTYPE_CODE, DTYPE_NAMES, FLOAT_CODES, FORMAT, FORMAT_VERSION, is_registry_base_name

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


@dataclass(frozen=True)
class CompressOptions:
    """How to compress: `codec` is the codec's options (its type names the codec, e.g.
    BitDeltaOptions(planes=2) or DeltaDQOptions(ratio=32)); the rest applies to every codec.
    `include` patterns force compression (e.g. `*embed_tokens*`), `exclude` patterns keep
    tensors dense; both are fnmatch globs over tensor names."""

    codec: CodecOptions = BitDeltaOptions()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    base_name: str | None = None
    #: Write a delta even when no tensor can be compressed because every shape differs from the
    #: base's (the delta is then the fine-tune stored dense).
    allow_dense: bool = False
    #: The dtype of the reconstructed model (format `dtype`): compressed tensors decode to it and
    #: changed dense tensors are stored cast to it. None: the fine-tune's own (by bytes).
    dtype: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.codec, CodecOptions):
            raise CodecError(f"codec options must be a codec's options object, got {self.codec!r}")
        codecs.for_options(self.codec)  # a registered codec
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise CodecError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")

    @property
    def codec_name(self) -> str:
        return self.codec.codec

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
    #: Tensors stored in a cheaper form than the codec's encoding, and why (`x-fallbacks`).
    fallbacks: dict[str, str] = field(default_factory=dict)
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
    """Write the delta of `finetuned_path` against `base_path` to `out_path` (atomically), each
    compressible tensor encoded by the codec `options.codec` names."""
    base = Checkpoint.open(base_path)
    ft = Checkpoint.open(finetuned_path)
    _check_names(base, ft)
    if not options.allow_dense:
        _check_some_tensor_compresses(base, ft, options)
    dtype_name = options.dtype or _model_dtype(ft, options)
    model_code = DTYPE_CODE[dtype_name]
    cast = options.dtype is not None
    codec = codecs.for_options(options.codec)
    context = EncodeContext(input_moments)
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
            # With a target dtype every floating tensor is rebuilt in it; else each keeps its own.
            stored_code = model_code if cast and fe.dtype in FLOAT_CODES else fe.dtype
            # A tensor the delta leaves out is the base's: only right when that has the stored layout.
            same_layout = fe.shape == be.shape and stored_code == be.dtype
            if (
                fe.shape == be.shape
                and (cast or fe.dtype == model_code)
                and options.binarizes(name, fe.shape, fe.dtype)
            ):
                encoding = codec.encode(f, b, name, options.codec, context)
                reason = _worse_than_base(codec, encoding)
                if reason is not None:
                    # Leave the tensor at base: store nothing, or (when the base's layout is not
                    # the one rebuilt) the codec's encoding of a zero delta.
                    report.fallbacks[name] = reason
                    if same_layout:
                        report.unchanged.append(name)
                        continue
                    encoding = codec.encode(b, b, name, options.codec, context)
                elif encoding.fallback is not None:  # the codec chose its own cheaper form
                    report.fallbacks[name] = encoding.fallback
                if same_layout and encoding.zero:
                    report.unchanged.append(name)
                    continue
                for piece in encoding.pieces:
                    io.submit(
                        functools.partial(
                            writer.add,
                            TensorSpec(f"{name}.{piece.kind}", piece.dtype, tuple(piece.tensor.shape)),
                            tensor_bytes(piece.tensor),
                        )
                    )
                report.binarized.append(name)
                continue
            # Codecs encode from the fine-tune's own values; only dense tensors are stored cast.
            dense = f if stored_code == fe.dtype else f.to(ST_TO_TORCH[stored_code])
            if same_layout and torch.equal(dense, b):
                report.unchanged.append(name)
            else:
                io.submit(
                    functools.partial(
                        writer.add,
                        TensorSpec(name + ".full", TORCH_TO_ST[dense.dtype], tuple(dense.shape)),
                        tensor_bytes(dense),
                    )
                )
                report.dense.append(name)
        io.join()
        report.base_fingerprint = "sha256:" + fp.hexdigest()
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "codec": codec.name,
            "base_model": options.base_name or _default_base_name(base),
            "base_fingerprint": report.base_fingerprint,
            "dtype": dtype_name,
            "created_with": f"deltastore {__version__}",
            "x-finetuned-bytes": str(ft.total_bytes),
        }
        metadata.update(codec.metadata(options.codec, context))
        if report.fallbacks:
            metadata["x-fallbacks"] = json.dumps(report.fallbacks, sort_keys=True)
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


def _worse_than_base(codec: codecs.Codec, encoding: Encoding) -> str | None:
    """Why `encoding` is worse, by the codec's own error proxy, than leaving the tensor at base
    (Δ̂ = 0, error ‖Δ‖²), or None when it is not (or the codec does not measure it)."""
    stats = encoding.stats
    if stats is None or encoding.zero or stats.target_sq <= 0:
        return None
    error = codec.error(stats)
    if error <= stats.target_sq:
        return None
    return (
        f"left at base: the {codec.name} encoding's error is {error / stats.target_sq:.4g}x that of no delta"
    )


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


__all__ = [
    "MAX_PLANES",
    "BitDeltaOptions",
    "CompressOptions",
    "CompressReport",
    "DeltaDQOptions",
    "ScaleMode",
    "compress",
    "registry_base_name",
]
