"""Apply a delta to its base: reconstruct the fine-tuned weights and write a loadable HF model
directory (sharded safetensors + index + config), tensor by tensor, atomically.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import codecs
from .background import OrderedWorker
from .checkpoint import FINGERPRINT_PREFIX, ST_TO_TORCH, Checkpoint, _fingerprint_record, tensor_bytes
from .container import SafetensorsWriter, TensorSpec
from .errors import BaseMismatchError, CodecError
from .files import OutputPathError, sha256_file, temp_dir_beside, write_atomic
from .format import DTYPE_CODE, DeltaFile

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclass
class ApplyReport:
    out_dir: Path
    shards: int
    tensors: int
    bytes_written: int
    base_fingerprint: str


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def apply_delta(
    base_path: str | os.PathLike[str],
    delta_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[str, int, int], None] | None = None,
) -> ApplyReport:
    """Reconstruct `W_ft = (W_base.float() + Δ̂).to(dtype)` for every tensor and write `out_dir`.

    Structural mismatches are refused before anything is written; the base fingerprint is
    hashed during the single pass over the base, and on a mismatch (without `force`) the
    half-built output is deleted, so no partial result is ever left at `out_dir`.
    """
    delta = DeltaFile.open(delta_path)
    base = Checkpoint.open(base_path)
    base_specs = {n: (base.entry(n).dtype, base.entry(n).shape) for n in base.names}
    delta.check_base(base_specs, None)

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CodecError(f"{out_dir}: output exists and is not an empty directory")
    for source in (base_path, delta_path):
        real_out, real_source = Path(os.path.realpath(out_dir)), Path(os.path.realpath(source))
        if real_out == real_source or real_source in real_out.parents or real_out in real_source.parents:
            raise OutputPathError(f"output {out_dir} overlaps the input {source}: refusing to write there")
    model_dtype = ST_TO_TORCH[DTYPE_CODE[delta.dtype_name]]

    specs: list[TensorSpec] = []
    for name in sorted(base.names):
        e = delta.entries.get(name)
        if e is None:
            specs.append(TensorSpec(name, *base_specs[name]))
        elif e.full is not None:
            specs.append(TensorSpec(name, e.full.dtype, e.full.shape))
        else:
            specs.append(TensorSpec(name, DTYPE_CODE[delta.dtype_name], base_specs[name][1]))
    shards = plan_shards(specs, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out_dir)
    fp = hashlib.sha256(FINGERPRINT_PREFIX)
    written = 0
    try:
        done = 0
        for shard_name, shard in zip(names, shards, strict=True):
            with (
                SafetensorsWriter(tmp / shard_name, shard, {"format": "pt"}) as writer,
                OrderedWorker() as io,
            ):
                for spec in shard:
                    if progress:
                        progress(spec.name, done, len(specs))
                    done += 1
                    b = base.get(spec.name)
                    # The base fingerprint is hashed on the I/O thread while this tensor is built.
                    io.submit(functools.partial(_hash_tensor, fp, spec.name, base_specs[spec.name], b))
                    e = delta.entries.get(spec.name)
                    if e is None:
                        writer.write(spec.name, tensor_bytes(b))
                    elif e.full is not None:
                        writer.write(spec.name, tensor_bytes(delta.full(spec.name)))
                    else:
                        blocks = codecs.get(e.kind).reconstruct_blocks(delta, spec.name, b, model_dtype)
                        writer.write_parts(spec.name, (tensor_bytes(block) for block in blocks))
                    written += spec.nbytes
        fingerprint = "sha256:" + fp.hexdigest()
        if fingerprint != delta.base_fingerprint and not force:
            raise BaseMismatchError(
                f"delta was made for base {delta.base_model!r} with fingerprint {delta.base_fingerprint}, "
                f"but {base_path} has fingerprint {fingerprint}",
                expected=delta.base_fingerprint,
                actual=fingerprint,
            )
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": written},
                "weight_map": {s.name: n for n, shard in zip(names, shards, strict=True) for s in shard},
            }
            write_atomic(
                tmp / "model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True).encode()
            )
        _write_config(base, delta, tmp)
        _write_model_card(delta, Path(delta_path), tmp)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ApplyReport(out_dir, len(shards), len(specs), written, fingerprint)


def _hash_tensor(fp, name, base_spec, base_tensor) -> None:
    fp.update(_fingerprint_record(name, *base_spec))
    fp.update(tensor_bytes(base_tensor))


def _write_config(base: Checkpoint, delta: DeltaFile, dest: Path) -> None:
    """config.json from the fine-tune (stored in the delta) or the base; other files (tokenizer,
    generation config) copied from the base directory."""
    config = delta.metadata.get("x-hf-config")
    if config is not None:
        write_atomic(dest / "config.json", json.dumps(json.loads(config), indent=2, sort_keys=True).encode())
    # The base's own model card is not this model's: _write_model_card writes one.
    skip = {"model.safetensors.index.json", "README.md"} | ({"config.json"} if config is not None else set())
    if base.root.is_dir():
        for f in base.root.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in skip:
                shutil.copy2(f, dest / f.name)


def _write_model_card(delta: DeltaFile, delta_path: Path, dest: Path) -> None:
    """README.md in the Hub's model-card form: the base it was rebuilt on, the delta's digest, codec
    and fidelity, so the directory can be uploaded as it is (`hf upload org/name DIR`)."""
    meta = delta.metadata
    source = json.loads(meta["x-base-source"]) if "x-base-source" in meta else None
    base_id = source["repo_id"] if source else delta.base_model
    lines = [
        "---",
        f"base_model: {json.dumps(base_id)}",
        "library_name: transformers",
        "tags:",
        "- deltastore",
        f"- {delta.codec}",
        "---",
        "",
        f"# {delta_path.stem}",
        "",
        f"This model was rebuilt by deltastore from a compressed delta (codec `{delta.codec}`) applied to "
        f"the base model `{base_id}`.",
        "",
        f"- delta: `{delta_path.name}`, {sha256_file(delta_path)}",
        f"- base fingerprint: {delta.base_fingerprint}",
    ]
    if source:
        lines.append(f"- base revision: `{source['revision']}` (commit `{source['commit']}`)")
    facts = codecs.get(delta.codec).describe(meta)
    if facts:
        lines.append(f"- {delta.codec}: {', '.join(facts)}")
    if "calibration" in meta:
        lines.append(f"- scales distilled on calibration text: `{meta['calibration']}`")
    if "fidelity" in meta:
        lines.append(f"- fidelity against the fine-tune: `{meta['fidelity']}`")
    write_atomic(dest / "README.md", ("\n".join(lines) + "\n").encode())
