"""Small valid format-v1 deltas built without torch: the seeds the fuzzers mutate and the
payloads the load and fault tests push. Each kind the format allows is represented.

    seeds = seed_deltas()                     # name -> bytes of a valid .bdelta
    blob = storage_form(delta_bytes(7))       # a distinct valid delta, zstd-compressed, with digests
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from dataclasses import dataclass

import numpy as np
import zstandard

BASE_NAME = "org/base"
FINGERPRINT = "sha256:" + "5a" * 32


def encode(tensors: list[tuple[str, str, list[int], bytes]], metadata: dict[str, str]) -> bytes:
    """A safetensors file laid out like the project's writer does (JSON padded to 8 bytes)."""
    doc: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, data in tensors:
        doc[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(t[3] for t in tensors)


def _meta(codec: str = "bitdelta", dtype: str = "float16", **extra: str) -> dict[str, str]:
    return {
        "format": "deltastore.delta",
        "format_version": "1",
        "codec": codec,
        "base_model": BASE_NAME,
        "base_fingerprint": FINGERPRINT,
        "dtype": dtype,
        "x-planes": "1",
        **extra,
    }


def _f32(values) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def seed_deltas() -> dict[str, bytes]:
    """One valid file of each shape of content: per-matrix 1 plane, per-row 2 planes with dense
    tensors, deltadq, an odd input width, zero-size and many small tensors."""
    rng = random.Random(0)
    signs = lambda planes, out, nb: rng.randbytes(planes * out * nb)  # noqa: E731
    seeds = {
        "per_matrix": encode(
            [
                ("model.layers.0.mlp.up_proj.weight.scale", "F32", [1, 1], _f32([0.01])),
                ("model.layers.0.mlp.up_proj.weight.sign", "U8", [1, 8, 2], signs(1, 8, 2)),
            ],
            _meta(calibration='{"steps": 10, "loss": 0.5}', fidelity='{"kl": 0.01}'),
        ),
        "per_row_2_planes_with_full": encode(
            [
                ("model.norm.weight.full", "F16", [16], np.linspace(0.5, 1.5, 16).astype("<f2").tobytes()),
                (
                    "model.layers.0.self_attn.q_proj.weight.scale",
                    "F32",
                    [2, 4],
                    _f32(np.linspace(0.01, 0.02, 8)),
                ),
                ("model.layers.0.self_attn.q_proj.weight.sign", "U8", [2, 4, 3], signs(2, 4, 3)),
                ("lm_head.weight.full", "BF16", [4, 4], rng.randbytes(32)),
            ],
            _meta(dtype="bfloat16", **{"x-planes": "2", "x-scale": "per-row"}),
        ),
        "deltadq": encode(
            [
                ("model.layers.0.mlp.down_proj.weight.dq_codes", "U8", [1, 4, 3], rng.randbytes(12)),
                (
                    "model.layers.0.mlp.down_proj.weight.dq_params",
                    "I32",
                    [3],
                    np.array([8, 4, 4], dtype="<i4").tobytes(),
                ),
                ("model.layers.0.mlp.down_proj.weight.dq_step", "F32", [4], _f32([0.1, 0.2, 0.3, 0.4])),
            ],
            _meta(codec="deltadq", dtype="float32", deltadq='{"seed": 7, "mask": "splitmix64-v1"}'),
        ),
        "odd_width_fp32": encode(
            [
                ("model.layers.1.mlp.gate_proj.weight.scale", "F32", [1, 1], _f32([0.5])),
                ("model.layers.1.mlp.gate_proj.weight.sign", "U8", [1, 3, 1], bytes([0b101, 0b011, 0b111])),
                ("model.embed_tokens.weight.full", "F64", [2, 2], _f32([1, 2, 3, 4]) * 2),
            ],
            _meta(dtype="float64"),
        ),
        "zero_size_and_many": encode(
            [("model.empty.weight.full", "F32", [0, 4], b"")]
            + [
                (f"model.layers.{i}.o.weight.{kind}", dt, shape, data)
                for i in range(6)
                for kind, dt, shape, data in (
                    ("scale", "F32", [1, 1], _f32([0.1 * (i + 1)])),
                    ("sign", "U8", [1, 2, 1], signs(1, 2, 1)),
                )
            ],
            _meta(**{"x-finetuned-bytes": "4096", "x-hf-config": '{"model_type": "llama"}'}),
        ),
    }
    return seeds


def delta_bytes(variant: int, *, rows: int = 64, width_bytes: int = 64) -> bytes:
    """A distinct valid delta per `variant` (different signs and metadata), about rows*width bytes."""
    rng = random.Random(variant)
    return encode(
        [
            ("model.layers.0.mlp.up_proj.weight.scale", "F32", [1, 1], _f32([0.01 + variant * 1e-6])),
            (
                "model.layers.0.mlp.up_proj.weight.sign",
                "U8",
                [1, rows, width_bytes],
                rng.randbytes(rows * width_bytes),
            ),
        ],
        _meta(**{"x-variant": str(variant), "x-finetuned-bytes": str(rows * width_bytes * 8 * 2)}),
    )


@dataclass(frozen=True)
class StoredDelta:
    """A delta in the registry's storage form (one zstd frame) with the four declared values."""

    data: bytes
    digest: str
    size: int
    raw_digest: str
    raw_size: int

    def declaration(self, **overrides) -> dict:
        return {
            "digest": self.digest,
            "size": self.size,
            "raw_digest": self.raw_digest,
            "raw_size": self.raw_size,
            **overrides,
        }


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def storage_form(raw: bytes, *, level: int = 3) -> StoredDelta:
    data = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)
    return StoredDelta(data, sha256(data), len(data), sha256(raw), len(raw))
