"""The hybrid codec (docs/lowrank.md): rank-r fp16 factors `N.lr_a` / `N.lr_b` of the delta plus
BitDelta sign planes `N.sign` / `N.scale` of what they leave; the math is codec/hybrid.py."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..container import TensorEntry
from ..errors import CodecError, IncompatibleDeltaError, InvalidDeltaError
from .base import (
    Codec,
    CodecOptions,
    EncodeContext,
    Encoding,
    ErrorStats,
    Piece,
    TensorDescription,
    require_parts,
)
from .bitdelta import CODEC as BITDELTA
from .bitdelta import MAX_PLANES, ScaleMode

if TYPE_CHECKING:
    import torch

    from ..format import DeltaEntry, DeltaFile
    from ..terms import Term

FACTOR_KINDS = ("lr_a", "lr_b")
MAX_RANK = 2**20


@dataclass(frozen=True)
class HybridOptions(CodecOptions):
    """A fixed `rank` (capped at each tensor's full rank), or a `ratio` vs fp16 that chooses each
    tensor's rank; `planes` and `scale_mode` of the residual's signs, as for BitDelta."""

    codec: ClassVar[str] = "hybrid"
    rank: int | None = None
    ratio: float | None = None
    planes: int = 1
    scale_mode: ScaleMode = "per-matrix"

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.ratio is None):
            raise CodecError("hybrid needs exactly one of --rank and --ratio")
        if self.rank is not None and not 1 <= self.rank <= MAX_RANK:
            raise CodecError(f"rank must be between 1 and {MAX_RANK}, got {self.rank}")
        if self.ratio is not None and not 1 < self.ratio < 16 / self.planes:
            raise CodecError(
                f"hybrid --ratio must be above 1 and below {16 / self.planes:g} ({self.planes} sign "
                f"plane(s) alone are {16 / self.planes:g}x), got {self.ratio:g}"
            )
        if not 1 <= self.planes <= MAX_PLANES:
            raise CodecError(f"bits/planes must be between 1 and {MAX_PLANES}, got {self.planes}")
        if self.scale_mode not in ("per-matrix", "per-row"):
            raise CodecError(f"scale mode must be 'per-matrix' or 'per-row', got {self.scale_mode!r}")


class Hybrid(Codec):
    name = "hybrid"
    options_type = HybridOptions
    kinds = FACTOR_KINDS + BITDELTA.kinds
    primary_kind = "sign"
    finite_kinds = ("scale", "lr_a", "lr_b")
    json_metadata_keys = ("hybrid",)
    calibration = "distill"
    label = "low rank + binarized residual"

    def default_options(self) -> HybridOptions:
        return HybridOptions()  # raises: --rank or --ratio is required

    # --- compress ---------------------------------------------------------------------------
    def encode(
        self,
        finetuned: torch.Tensor,
        base: torch.Tensor,
        name: str,
        options: HybridOptions,
        context: EncodeContext,
    ) -> Encoding:
        import torch

        from .. import hybrid, lowrank

        out, inn = finetuned.shape
        per_row = options.scale_mode == "per-row"
        if options.ratio is not None:
            rank = hybrid.rank_for_ratio(out, inn, options.ratio, options.planes, per_row)
            if rank < 1:
                raise CodecError(
                    f"{name}: ratio {options.ratio:g} leaves no room for a rank-1 part in a {out}x{inn} "
                    f"tensor beside its {options.planes} sign plane(s); use a lower --ratio or --rank"
                )
        else:
            rank = min(options.rank, out, inn)
        h = hybrid.encode(finetuned, base, rank, options.planes, options.scale_mode)
        delta = lowrank.delta_of(finetuned, base)
        decoded = hybrid.decode(h, inn)
        weight = context.channel_weight(name, inn)
        w = 1.0 if weight is None else weight.float()[None, :]
        stats = ErrorStats(
            float((decoded * delta * w).sum(dtype=torch.float64)),
            float((decoded * decoded * w).sum(dtype=torch.float64)),
            float((delta * delta * w).sum(dtype=torch.float64)),
        )
        pieces = [
            Piece("lr_a", "F16", h.a),
            Piece("lr_b", "F16", h.b),
            Piece("sign", "U8", h.sign),
            Piece("scale", "F32", h.scale),
        ]
        zero = not bool(h.scale.any()) and not bool(h.a.any())
        return Encoding(pieces, zero=zero, stats=stats)

    def metadata(self, options: HybridOptions, context: EncodeContext) -> dict[str, str]:
        return {
            "hybrid": json.dumps(
                {
                    "rank": options.rank,
                    "ratio": options.ratio,
                    "planes": options.planes,
                    "scale": options.scale_mode,
                },
                sort_keys=True,
            )
        }

    # --- reading (numpy only) ---------------------------------------------------------------
    def check_parts(self, name: str, parts: Mapping[str, TensorEntry]) -> None:
        require_parts(name, parts, self.kinds, self.name)
        BITDELTA.check_parts(name, {k: parts[k] for k in BITDELTA.kinds})
        a, b = parts["lr_a"], parts["lr_b"]
        if a.dtype != "F16" or len(a.shape) != 2 or not 1 <= a.shape[0] <= MAX_RANK:
            raise InvalidDeltaError(f"{name}.lr_a must be F16 [rank >= 1, in], got {a.dtype}{list(a.shape)}")
        if b.dtype != "F16" or list(b.shape) != [parts["sign"].shape[1], a.shape[0]]:
            raise InvalidDeltaError(
                f"{name}.lr_b must be F16 [{parts['sign'].shape[1]}, {a.shape[0]}] (out rows of .sign, "
                f"rank of .lr_a), got {b.dtype}{list(b.shape)}"
            )

    def expected_shapes(self, entry: DeltaEntry, info: Any, shape: tuple[int, int]) -> dict[str, list[int]]:
        out, inn = shape
        rank = entry.part("lr_a").shape[0]
        if rank > min(out, inn):
            raise IncompatibleDeltaError(
                f"{entry.name}.lr_a: rank {rank} exceeds the full rank {min(out, inn)} of the base "
                f"tensor {list(shape)}"
            )
        return {"sign": [entry.planes, out, (inn + 7) // 8], "lr_a": [rank, inn], "lr_b": [out, rank]}

    def covered_weights(self, entry: DeltaEntry) -> int:
        return entry.part("lr_b").shape[0] * entry.part("lr_a").shape[1]

    def describe_tensor(self, entry: DeltaEntry, info: Any) -> TensorDescription:
        planes, out, _ = entry.sign.shape
        return TensorDescription(
            {
                "rank": entry.part("lr_a").shape[0],
                "planes": planes,
                "rows": out,
                "scale": "per-row" if entry.per_row else "per-matrix",
            },
            payload_bytes=entry.sign.nbytes + entry.part("lr_a").nbytes + entry.part("lr_b").nbytes,
            side_bytes=entry.scale.nbytes,
            weights=self.covered_weights(entry),
        )

    def describe(self, metadata: Mapping[str, str], bits: int | None = None) -> list[str]:
        try:
            params = json.loads(metadata.get("hybrid", ""))
        except (TypeError, ValueError):
            return []
        if not isinstance(params, dict):
            return []
        parts = []
        if isinstance(params.get("rank"), int):
            parts.append(f"rank {params['rank']}")
        if isinstance(params.get("ratio"), int | float):
            parts.append(f"ratio {params['ratio']:g}")
        if isinstance(params.get("planes"), int):
            parts.append(f"{params['planes']} plane" + ("s" if params["planes"] != 1 else ""))
        if params.get("scale") in ("per-matrix", "per-row"):
            parts.append(params["scale"])
        return parts

    # --- decoding ---------------------------------------------------------------------------
    def factors(self, delta: DeltaFile, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(a fp32 [rank, in], b fp32 [out, rank]): the F16 factors widened (exactly)."""
        import torch

        return delta.tensor(name + ".lr_a").to(torch.float32), delta.tensor(name + ".lr_b").to(torch.float32)

    def reconstruct_blocks(
        self, delta: DeltaFile, name: str, base: torch.Tensor, dtype: torch.dtype
    ) -> Iterator[torch.Tensor]:
        from .. import hybrid

        a, b = self.factors(delta, name)
        return hybrid.reconstruct_blocks(base, a, b, delta.sign(name), delta.scale(name), dtype)

    def terms(self, delta: DeltaFile, name: str) -> tuple[Term, ...]:
        from ..terms import LowRankTerm, SignTerm

        rank = delta.entries[name].part("lr_a").shape[0]
        return (
            LowRankTerm(rank, lambda: self.factors(delta, name)),
            SignTerm(name + ".sign", name + ".scale"),
        )


CODEC = Hybrid()

__all__ = ["CODEC", "Hybrid", "HybridOptions"]
