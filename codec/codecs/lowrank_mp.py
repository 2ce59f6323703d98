"""The lowrank-mp codec (docs/lowrank.md): SVD factors of the delta quantized group-wise at a bit
width per band of singular vectors, stored as `N.lr_codes`, `N.lr_scales`, `N.lr_bands`,
`N.lr_shape` (or as
1-bit `N.sign` / `N.scale` where the safety rule found those closer); the math is codec/lowrank.py."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..container import TensorEntry, strict_json_loads
from ..errors import CodecError, IncompatibleDeltaError, InvalidDeltaError
from ..lowrank_params import Layout, check_sizes
from .base import (
    Codec,
    CodecOptions,
    EncodeContext,
    Encoding,
    ErrorStats,
    Piece,
    ReadArray,
    TensorDescription,
    require_parts,
)

if TYPE_CHECKING:
    import torch

    from ..format import DeltaEntry, DeltaFile
    from ..terms import Term

LOWRANK_KINDS = ("lr_codes", "lr_scales", "lr_bands", "lr_shape")
SIGN_KINDS = ("sign", "scale")
#: More bands than this is a forged table (the encoder writes at most three).
MAX_BANDS = 64
DEFAULT_GROUP_SIZE = 128


@dataclass(frozen=True)
class LowRankMPOptions(CodecOptions):
    """`ratio` vs fp16, kept by every tensor; `group_size` of the quantization groups; `signs`:
    let the safety rule store 1-bit signs where they are closer (ratios ≤ 16)."""

    codec: ClassVar[str] = "lowrank-mp"
    ratio: float | None = None
    group_size: int = DEFAULT_GROUP_SIZE
    signs: bool = True

    def __post_init__(self) -> None:
        if self.ratio is None:
            raise CodecError("lowrank-mp needs --ratio (the size ratio vs fp16 every tensor keeps)")
        if not 2 <= self.ratio <= 16384:
            raise CodecError(f"ratio must be between 2 and 16384, got {self.ratio}")
        if not 1 <= self.group_size < 2**31:
            raise CodecError(f"group size must be >= 1, got {self.group_size}")


class LowRankMP(Codec):
    name = "lowrank-mp"
    options_type = LowRankMPOptions
    kinds = LOWRANK_KINDS + SIGN_KINDS
    primary_kind = "lr_codes"
    # BF16 steps and fallback F32 scales are checked in read_info (the reader has no bf16 dtype).
    finite_kinds = ()
    json_metadata_keys = ("lowrank",)
    calibration = "moments"
    label = "low-rank, mixed precision"

    def default_options(self) -> LowRankMPOptions:
        return LowRankMPOptions()  # raises: --ratio is required

    # --- compress ---------------------------------------------------------------------------
    def encode(
        self,
        finetuned: torch.Tensor,
        base: torch.Tensor,
        name: str,
        options: LowRankMPOptions,
        context: EncodeContext,
    ) -> Encoding:
        import torch

        from .. import bitdelta, lowrank

        weight = context.channel_weight(name, finetuned.shape[-1])
        choice = lowrank.choose(
            finetuned,
            base,
            name,
            ratio=options.ratio,
            group_sizes=(options.group_size,),
            weight=weight,
            allow_signs=options.signs,
        )
        delta = lowrank.delta_of(finetuned, base)
        if choice.kind == "signs":
            decoded = bitdelta.decode(choice.sign, choice.scale, delta.shape[1])
            w = 1.0 if weight is None else weight.float()[None, :]
            stats = ErrorStats(
                float((decoded * delta * w).sum(dtype=torch.float64)),
                float((decoded * decoded * w).sum(dtype=torch.float64)),
                float((delta * delta * w).sum(dtype=torch.float64)),
            )
            errors = dict(choice.alternatives)
            return Encoding(
                [Piece("sign", "U8", choice.sign), Piece("scale", "F32", choice.scale)],
                zero=not bool(choice.scale.any()),
                stats=stats,
                fallback=(
                    f"1-bit signs: error {errors['signs']:.4g} < low rank {errors['lowrank']:.4g} "
                    f"at ratio {options.ratio:g}"
                ),
            )
        enc = choice.encoded
        stats = ErrorStats(*lowrank.product_stats(delta, enc.a, enc.b, weight))
        return Encoding(
            [
                Piece("lr_codes", "U8", enc.codes),
                Piece("lr_scales", "BF16", enc.steps),
                Piece("lr_bands", "I32", enc.bands),
                Piece("lr_shape", "I32", enc.shape),
            ],
            zero=not bool(enc.steps.float().any()),
            stats=stats,
        )

    def metadata(self, options: LowRankMPOptions, context: EncodeContext) -> dict[str, str]:
        return {
            "lowrank": json.dumps(
                {
                    "ratio": options.ratio,
                    "group_size": options.group_size,
                    "signs_allowed": options.signs,
                    "search": context.search_record(),
                },
                sort_keys=True,
            )
        }

    # --- reading (numpy only) ---------------------------------------------------------------
    def validate_metadata(self, metadata: Mapping[str, str]) -> None:
        if "lowrank" not in metadata:
            return
        try:
            value = strict_json_loads(metadata["lowrank"])
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise InvalidDeltaError("metadata 'lowrank' must be a JSON object")

    def check_parts(self, name: str, parts: Mapping[str, TensorEntry]) -> None:
        if any(k in parts for k in SIGN_KINDS) and not any(k in parts for k in LOWRANK_KINDS):
            from .bitdelta import CODEC as BITDELTA

            BITDELTA.check_parts(name, parts)  # a tensor the safety rule stored as signs
            return
        require_parts(name, parts, LOWRANK_KINDS, self.name)
        codes, steps, bands, shape = (parts[k] for k in LOWRANK_KINDS)
        if codes.dtype != "U8" or len(codes.shape) != 1:
            raise InvalidDeltaError(
                f"{name}.lr_codes must be U8 [bytes], got {codes.dtype}{list(codes.shape)}"
            )
        if steps.dtype != "BF16" or len(steps.shape) != 1:
            raise InvalidDeltaError(
                f"{name}.lr_scales must be BF16 [groups], got {steps.dtype}{list(steps.shape)}"
            )
        if (
            bands.dtype != "I32"
            or len(bands.shape) != 2
            or bands.shape[1] != 4
            or not 1 <= bands.shape[0] <= MAX_BANDS
        ):
            raise InvalidDeltaError(
                f"{name}.lr_bands must be I32 [1 to {MAX_BANDS} bands, 4] (rank_start, rank_end, bits, "
                f"group_size), got {bands.dtype}{list(bands.shape)}"
            )
        if shape.dtype != "I32" or list(shape.shape) != [2]:
            raise InvalidDeltaError(
                f"{name}.lr_shape must be I32 [2] (out, in), got {shape.dtype}{list(shape.shape)}"
            )

    def read_info(self, entry: DeltaEntry, read: ReadArray) -> StoredLowRank | None:
        """The band table and shape, checked against each other and the stored lengths; finite
        steps (or, for a tensor stored as signs, finite scales)."""
        if entry.part("lr_bands") is None:
            if not np.isfinite(read(entry.scale).view("<f4")).all():
                raise InvalidDeltaError(f"{entry.name}.scale contains NaN or Inf")
            return None
        out, inn = (int(v) for v in read(entry.part("lr_shape")).view("<i4"))
        if not (1 <= out < 2**31 and 1 <= inn < 2**31):
            raise InvalidDeltaError(f"{entry.name}.lr_shape: ({out}, {inn}) is not a tensor shape")
        rows = read(entry.part("lr_bands")).view("<i4").reshape(-1, 4)
        try:
            layout = Layout.from_rows(rows.tolist(), out, inn)
            lowrank_sizes(entry, layout, out, inn)
        except CodecError as exc:
            raise InvalidDeltaError(f"{entry.name}: {exc}") from None
        # bf16 is the top half of an fp32: widen the raw 16-bit words to check them.
        raw = read(entry.part("lr_scales")).view("<u2")
        if not np.isfinite((raw.astype("<u4") << 16).view("<f4")).all():
            raise InvalidDeltaError(f"{entry.name}.lr_scales contains NaN or Inf")
        return StoredLowRank(layout, out, inn)

    def expected_shapes(
        self, entry: DeltaEntry, info: StoredLowRank | None, shape: tuple[int, int]
    ) -> dict[str, list[int]]:
        out, inn = shape
        if info is None:
            return {"sign": [entry.planes, out, (inn + 7) // 8]}
        if (info.out, info.inn) != (out, inn):
            raise IncompatibleDeltaError(
                f"{entry.name}.lr_shape is [{info.out}, {info.inn}] but the base tensor is {list(shape)}"
            )
        return {}

    def describe_tensor(self, entry: DeltaEntry, info: StoredLowRank | None) -> TensorDescription:
        if info is None:
            planes, out, packed = entry.sign.shape
            return TensorDescription(
                {"form": "signs (safety rule)", "planes": planes, "rows": out},
                payload_bytes=entry.sign.nbytes,
                side_bytes=entry.scale.nbytes,
                weights=out * packed * 8,
            )
        return TensorDescription(
            {"form": "low rank", "rank": info.layout.rank, "bands": info.layout.describe()},
            payload_bytes=entry.part("lr_codes").nbytes,
            side_bytes=sum(entry.part(k).nbytes for k in ("lr_scales", "lr_bands", "lr_shape")),
            weights=info.out * info.inn,
        )

    def covered_weights(self, entry: DeltaEntry) -> int | None:
        return entry.sign.shape[1] * entry.sign.shape[2] * 8 if entry.part("lr_bands") is None else None

    def describe(self, metadata: Mapping[str, str], bits: int | None = None) -> list[str]:
        try:
            params = json.loads(metadata.get("lowrank", ""))
        except (TypeError, ValueError):
            return []
        parts = []
        if isinstance(params, dict) and isinstance(params.get("ratio"), int | float):
            parts.append(f"ratio {params['ratio']:g}")
        if isinstance(params, dict) and isinstance(params.get("group_size"), int):
            parts.append(f"group {params['group_size']}")
        return parts

    # --- decoding ---------------------------------------------------------------------------
    def factors(self, delta: DeltaFile, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(a fp32 [rank, in], b fp32 [out, rank]) of a low-rank tensor, as decoding multiplies them."""
        from .. import lowrank

        info: StoredLowRank = delta.tensor_info(name)
        return lowrank.decode_factors(
            delta.tensor(name + ".lr_codes"),
            delta.tensor(name + ".lr_scales"),
            info.layout,
            info.out,
            info.inn,
        )

    def reconstruct_blocks(
        self, delta: DeltaFile, name: str, base: torch.Tensor, dtype: torch.dtype
    ) -> Iterator[torch.Tensor]:
        if delta.tensor_info(name) is None:
            from ..bitdelta import reconstruct_blocks

            return reconstruct_blocks(base, delta.sign(name), delta.scale(name), dtype)
        from .. import lowrank

        a, b = self.factors(delta, name)
        return lowrank.reconstruct_blocks(base, a, b, dtype)

    def terms(self, delta: DeltaFile, name: str) -> tuple[Term, ...]:
        from ..terms import LowRankTerm, SignTerm

        info: StoredLowRank | None = delta.tensor_info(name)
        if info is None:
            return (SignTerm(name + ".sign", name + ".scale"),)
        return (LowRankTerm(info.layout.rank, lambda: self.factors(delta, name)),)


@dataclass(frozen=True)
class StoredLowRank:
    """What `read_info` found in a low-rank tensor's small tensors."""

    layout: Layout
    out: int
    inn: int


def lowrank_sizes(entry: DeltaEntry, layout: Layout, out: int, inn: int) -> None:
    """The stored code and step counts must be exactly what the band table needs."""
    check_sizes(entry.part("lr_codes").shape[0], entry.part("lr_scales").shape[0], layout, out, inn)


CODEC = LowRankMP()

__all__ = ["CODEC", "LowRankMP", "LowRankMPOptions", "StoredLowRank"]
