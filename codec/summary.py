"""`inspect`: what a delta file holds — metadata, per-tensor kinds/shapes/bits, sizes, ratio."""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import codecs
from .format import DeltaFile


def summarize(path: str | os.PathLike[str]) -> dict:
    """A JSON-ready description of the validated delta at `path`."""
    delta = DeltaFile.open(path)
    file_bytes = Path(path).stat().st_size
    tensors = []
    sign_bytes = scale_bytes = full_bytes = binarized_weights = 0
    for name in sorted(delta.entries):
        e = delta.entries[name]
        if e.kind == "full":
            full_bytes += e.full.nbytes
            tensors.append(
                {
                    "name": name,
                    "kind": "full",
                    "dtype": e.full.dtype,
                    "shape": list(e.full.shape),
                    "bytes": e.nbytes,
                }
            )
            continue
        described = codecs.get(e.kind).describe_tensor(e, delta.tensor_info(name))
        sign_bytes += described.payload_bytes
        scale_bytes += described.side_bytes
        binarized_weights += described.weights
        tensors.append({"name": name, "kind": e.kind, **described.fields, "bytes": e.nbytes})
    meta = dict(delta.metadata)
    hf_config = meta.pop("x-hf-config", None)
    for key in ("calibration", "fidelity", "x-fallbacks", *codecs.json_metadata_keys()):
        if key in meta:
            meta[key] = json.loads(meta[key])
    ft_bytes = int(meta["x-finetuned-bytes"]) if meta.get("x-finetuned-bytes", "").isdigit() else None
    return {
        "path": str(path),
        "codec": delta.codec,
        "base_model": delta.base_model,
        "base_fingerprint": delta.base_fingerprint,
        "dtype": delta.dtype_name,
        "metadata": meta,
        "has_config": hf_config is not None,
        "file_bytes": file_bytes,
        "finetuned_bytes": ft_bytes,
        "ratio": (ft_bytes / file_bytes) if ft_bytes else None,
        "counts": {kind: sum(1 for t in tensors if t["kind"] == kind) for kind in (*codecs.names(), "full")},
        "bytes": {"sign": sign_bytes, "scale": scale_bytes, "full": full_bytes},
        "bits_per_binarized_weight": ((sign_bytes + scale_bytes) * 8 / binarized_weights)
        if binarized_weights
        else None,
        "tensors": tensors,
        # Tensors compress stored in a cheaper form than the codec's (e.g. left at base), and why.
        "fallbacks": meta.get("x-fallbacks", {}),
    }
