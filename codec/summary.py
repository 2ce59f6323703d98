"""`inspect`: what a delta file holds — metadata, per-tensor kinds/shapes/bits, sizes, ratio."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .format import DeltaFile


def summarize(path: str | os.PathLike[str]) -> dict:
    """A JSON-ready description of the validated delta at `path`."""
    delta = DeltaFile.open(path)
    file_bytes = Path(path).stat().st_size
    tensors = []
    sign_bytes = scale_bytes = full_bytes = binarized_weights = 0
    for name in sorted(delta.entries):
        e = delta.entries[name]
        if e.full is not None:
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
        elif e.dq_codes is not None:
            p = delta.dq_params(name)
            sign_bytes += e.dq_codes.nbytes
            scale_bytes += e.dq_step.nbytes + e.dq_params.nbytes
            rows = e.dq_codes.shape[1]
            # Columns follow from the kept count: in ≈ kept / keep ratio (exact for whole groups).
            kept = e.dq_codes.shape[2] * 8 // p.part_bits
            binarized_weights += rows * round(kept / p.keep_ratio)
            tensors.append(
                {
                    "name": name,
                    "kind": "deltadq",
                    "rows": rows,
                    "group_size": p.group_size,
                    "keep": p.keep,
                    "keep_ratio": p.keep_ratio,
                    "bits": p.bits,
                    "parts": p.parts,
                    "bytes": e.nbytes,
                }
            )
        else:
            planes, out, packed = e.sign.shape
            sign_bytes += e.sign.nbytes
            scale_bytes += e.scale.nbytes
            binarized_weights += out * packed * 8  # upper bound: the last byte may hold padding
            tensors.append(
                {
                    "name": name,
                    "kind": "bitdelta",
                    "planes": planes,
                    "rows": out,
                    "packed_cols": packed,
                    "scale": "per-row" if e.per_row else "per-matrix",
                    "bytes": e.nbytes,
                }
            )
    meta = dict(delta.metadata)
    hf_config = meta.pop("x-hf-config", None)
    for key in ("calibration", "fidelity", "deltadq"):
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
        "counts": {
            "bitdelta": sum(1 for t in tensors if t["kind"] == "bitdelta"),
            "deltadq": sum(1 for t in tensors if t["kind"] == "deltadq"),
            "full": sum(1 for t in tensors if t["kind"] == "full"),
        },
        "bytes": {"sign": sign_bytes, "scale": scale_bytes, "full": full_bytes},
        "bits_per_binarized_weight": ((sign_bytes + scale_bytes) * 8 / binarized_weights)
        if binarized_weights
        else None,
        "tensors": tensors,
    }
