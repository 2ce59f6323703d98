"""The BitDelta codec (docs/format.md): sign planes `N.sign` plus their scales `N.scale`; the math
(binarize, decode, reconstruct) is codec/bitdelta.py."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..container import TensorEntry
from ..errors import CodecError, InvalidDeltaError
from .base import Codec, CodecOptions, EncodeContext, Encoding, ErrorStats, Piece, TensorDescription

if TYPE_CHECKING:
    import torch

    from ..format import DeltaEntry, DeltaFile
    from ..terms import Term

ScaleMode = Literal["per-matrix", "per-row"]
MAX_PLANES = 8
_STATS_ROWS = 256  # rows per block when measuring the encoding's error


@dataclass(frozen=True)
class BitDeltaOptions(CodecOptions):
    """`planes` sign planes of residual binarization, scales per matrix or per output row."""

    codec: ClassVar[str] = "bitdelta"
    planes: int = 1
    scale_mode: ScaleMode = "per-matrix"

    def __post_init__(self) -> None:
        if not 1 <= self.planes <= MAX_PLANES:
            raise CodecError(f"bits/planes must be between 1 and {MAX_PLANES}, got {self.planes}")
        if self.scale_mode not in ("per-matrix", "per-row"):
            raise CodecError(f"scale mode must be 'per-matrix' or 'per-row', got {self.scale_mode!r}")


class BitDelta(Codec):
    name = "bitdelta"
    options_type = BitDeltaOptions
    kinds = ("sign", "scale")
    primary_kind = "sign"
    finite_kinds = ("scale",)
    calibration = "distill"
    label = "binarized (sign + scale)"

    def encode(
        self,
        finetuned: torch.Tensor,
        base: torch.Tensor,
        name: str,
        options: BitDeltaOptions,
        context: EncodeContext,
    ) -> Encoding:
        import torch

        from ..bitdelta import binarize, decode

        sign, scale = binarize(finetuned, base, options.planes, options.scale_mode)
        per_row = scale.shape[1] != 1

        def blocks():
            for r in range(0, sign.shape[1], _STATS_ROWS):
                e = min(sign.shape[1], r + _STATS_ROWS)
                target = finetuned[r:e].to(torch.float32) - base[r:e].to(torch.float32)
                yield target, decode(sign[:, r:e], scale[:, r:e] if per_row else scale, finetuned.shape[1])

        stats = ErrorStats.of_blocks(blocks(), context.channel_weight(name, finetuned.shape[1]))
        pieces = [Piece("sign", "U8", sign), Piece("scale", "F32", scale)]
        return Encoding(pieces, zero=not bool(scale.any()), stats=stats)  # all scales 0: Δ̂ = 0

    def metadata(self, options: BitDeltaOptions, context: EncodeContext) -> dict[str, str]:
        return {"x-planes": str(options.planes), "x-scale": options.scale_mode}

    def check_parts(self, name: str, parts: Mapping[str, TensorEntry]) -> None:
        sign, scale = parts.get("sign"), parts.get("scale")
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

    def expected_shapes(self, entry: DeltaEntry, info: Any, shape: tuple[int, int]) -> dict[str, list[int]]:
        out, inn = shape
        return {"sign": [entry.planes, out, (inn + 7) // 8]}

    def covered_weights(self, entry: DeltaEntry) -> int:
        _, out, packed = entry.sign.shape
        return out * packed * 8  # upper bound: the last byte may hold padding

    def describe_tensor(self, entry: DeltaEntry, info: Any) -> TensorDescription:
        planes, out, packed = entry.sign.shape
        return TensorDescription(
            {
                "planes": planes,
                "rows": out,
                "packed_cols": packed,
                "scale": "per-row" if entry.per_row else "per-matrix",
            },
            payload_bytes=entry.sign.nbytes,
            side_bytes=entry.scale.nbytes,
            weights=self.covered_weights(entry),
        )

    def describe(self, metadata: Mapping[str, str], bits: int | None = None) -> list[str]:
        planes = bits or (int(metadata["x-planes"]) if str(metadata.get("x-planes", "")).isdigit() else None)
        parts = [f"{planes} plane" + ("s" if planes != 1 else "")] if planes else []
        if metadata.get("x-scale"):
            parts.append(str(metadata["x-scale"]))
        return parts

    def reconstruct_blocks(
        self, delta: DeltaFile, name: str, base: torch.Tensor, dtype: torch.dtype
    ) -> Iterator[torch.Tensor]:
        from ..bitdelta import reconstruct_blocks

        return reconstruct_blocks(base, delta.sign(name), delta.scale(name), dtype)

    def terms(self, delta: DeltaFile, name: str) -> tuple[Term, ...]:
        from ..terms import SignTerm

        return (SignTerm(name + ".sign", name + ".scale"),)


CODEC = BitDelta()
