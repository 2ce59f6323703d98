"""The DeltaDQ codec (docs/deltadq.md): group-wise dropout + quantization, stored as `N.dq_codes`,
`N.dq_step`, `N.dq_params` and the file's `deltadq` metadata; the math is codec/deltadq.py."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..container import TensorEntry, strict_json_loads
from ..deltadq_params import DQParams
from ..errors import CodecError, InvalidDeltaError, UnsupportedFormatError
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

#: The dropout-mask algorithm this reader knows (docs/deltadq.md).
DQ_MASK = "splitmix64-v1"


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class DeltaDQOptions(CodecOptions):
    """A target `ratio` vs fp16, or explicit `bits` + `keep` ratio; `group_size` None = "auto"
    (searched per tensor); `parts` separate code planes; `seed` of the dropout mask."""

    codec: ClassVar[str] = "deltadq"
    ratio: float | None = None
    bits: int | None = None
    keep: float | None = None
    group_size: int | None = None
    parts: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ratio is None and (self.bits is None or self.keep is None):
            raise CodecError("deltadq needs --ratio, or both --dq-bits and --keep")
        if self.ratio is not None and (self.bits is not None or self.keep is not None):
            raise CodecError("give either --ratio or --dq-bits/--keep, not both")
        if self.ratio is not None and not 16 <= self.ratio <= 16384:
            raise CodecError(f"ratio must be between 16 and 16384, got {self.ratio}")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise CodecError(f"keep ratio must be in (0, 1], got {self.keep}")
        if self.bits is not None and not 1 <= self.bits <= 8:
            raise CodecError(f"deltadq bits must be between 1 and 8, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise CodecError(f"group size must be >= 1 (or auto), got {self.group_size}")
        if self.group_size is not None and self.keep is not None and self.group_size * self.keep < 1:
            raise CodecError(
                f"group size {self.group_size} × keep {self.keep} keeps nothing: use a larger group"
            )
        if self.parts < 1 or (self.bits is not None and self.bits % self.parts):
            raise CodecError(f"parts must be >= 1 and divide the bits, got {self.parts}")
        if not 0 <= self.seed < 2**64:
            raise CodecError("seed must be in [0, 2^64)")


class DeltaDQ(Codec):
    name = "deltadq"
    options_type = DeltaDQOptions
    kinds = ("dq_codes", "dq_step", "dq_params")
    primary_kind = "dq_codes"
    finite_kinds = ("dq_step",)
    json_metadata_keys = ("deltadq",)
    calibration = "moments"
    label = "DeltaDQ codes"

    def default_options(self) -> DeltaDQOptions:
        raise CodecError("deltadq needs --ratio, or both --dq-bits and --keep")

    def encode(
        self,
        finetuned: torch.Tensor,
        base: torch.Tensor,
        name: str,
        options: DeltaDQOptions,
        context: EncodeContext,
    ) -> Encoding:
        import torch

        from .. import deltadq

        params = deltadq.choose(
            finetuned,
            base,
            name,
            options.seed,
            ratio=options.ratio,
            bits=options.bits,
            keep_ratio=options.keep,
            group_size=options.group_size,
            parts=options.parts,
            channel_weight=context.channel_weight(name, finetuned.shape[-1]),
        )
        weight = context.channel_weight(name, finetuned.shape[-1])
        codes, step, measured = deltadq.encode_measured(finetuned, base, name, options.seed, params, weight)
        stats = ErrorStats(*measured)
        stored = torch.tensor([params.group_size, params.keep, params.bits], dtype=torch.int32)
        pieces = [
            Piece("dq_codes", "U8", codes),
            Piece("dq_step", "F32", step),
            Piece("dq_params", "I32", stored),
        ]
        return Encoding(pieces, zero=not bool(step.any()), stats=stats)

    def error(self, stats: ErrorStats) -> float:
        """The error of Δ̂'s component along Δ. Dropout's rescaled survivors are unbiased but
        noisy: on SmolLM2's fine-tune ‖Δ − Δ̂‖² is 1.05-1.21x ‖Δ‖² on every tensor measured at
        ratios 16 and 32, yet such files keep 98 % of the fine-tune's gain, so the full squared
        error would leave every tensor at base (docs/codecs.md). Along Δ, only a Δ̂ that points
        against Δ or overshoots it more than 2x is worse than none."""
        return stats.along_delta_error

    def metadata(self, options: DeltaDQOptions, context: EncodeContext) -> dict[str, str]:
        return {
            "deltadq": json.dumps(
                {
                    "seed": options.seed,
                    "mask": DQ_MASK,
                    "ratio": options.ratio,
                    "bits": options.bits,
                    "keep": options.keep,
                    "group_size": options.group_size or "auto",
                    "parts": options.parts,
                    "search": context.search_record(),
                },
                sort_keys=True,
            )
        }

    def validate_metadata(self, metadata: Mapping[str, str]) -> None:
        try:
            dq = strict_json_loads(metadata.get("deltadq", ""))
        except ValueError:
            raise InvalidDeltaError("codec 'deltadq' needs a 'deltadq' metadata key holding JSON") from None
        seed = dq.get("seed") if isinstance(dq, dict) else None
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise InvalidDeltaError("deltadq metadata needs an integer 'seed' in [0, 2^64)")
        if dq.get("mask") != DQ_MASK:
            raise UnsupportedFormatError(
                f"deltadq mask algorithm {_show(dq.get('mask'))} is not supported (known: {DQ_MASK!r})"
            )

    def check_parts(self, name: str, parts: Mapping[str, TensorEntry]) -> None:
        require_parts(name, parts, self.kinds, self.name)
        codes, step, params = parts["dq_codes"], parts["dq_step"], parts["dq_params"]
        if codes.dtype != "U8" or len(codes.shape) != 3 or codes.shape[0] < 1:
            raise InvalidDeltaError(
                f"{name}.dq_codes must be U8 [parts>=1, out, packed], got {codes.dtype}{list(codes.shape)}"
            )
        if step.dtype != "F32" or list(step.shape) != [codes.shape[1]]:
            raise InvalidDeltaError(
                f"{name}.dq_step must be F32 [{codes.shape[1]}], got {step.dtype}{list(step.shape)}"
            )
        if params.dtype != "I32" or list(params.shape) != [3]:
            raise InvalidDeltaError(
                f"{name}.dq_params must be I32 [3] (group_size, "
                f"keep, bits), got {params.dtype}{list(params.shape)}"
            )

    def read_info(self, entry: DeltaEntry, read: ReadArray) -> DQParams:
        group_size, keep, bits = (int(v) for v in read(entry.dq_params))
        try:
            return DQParams(group_size, keep, bits, entry.dq_codes.shape[0])
        except CodecError as exc:
            raise InvalidDeltaError(f"{entry.name}.dq_params: {exc}") from None

    def expected_shapes(
        self, entry: DeltaEntry, info: DQParams, shape: tuple[int, int]
    ) -> dict[str, list[int]]:
        out, inn = shape
        return {"dq_codes": [info.parts, out, info.packed_width(inn)]}

    def describe_tensor(self, entry: DeltaEntry, info: DQParams) -> TensorDescription:
        rows = entry.dq_codes.shape[1]
        # Columns follow from the kept count: in ≈ kept / keep ratio (exact for whole groups).
        kept = entry.dq_codes.shape[2] * 8 // info.part_bits
        return TensorDescription(
            {
                "rows": rows,
                "group_size": info.group_size,
                "keep": info.keep,
                "keep_ratio": info.keep_ratio,
                "bits": info.bits,
                "parts": info.parts,
            },
            payload_bytes=entry.dq_codes.nbytes,
            side_bytes=entry.dq_step.nbytes + entry.dq_params.nbytes,
            weights=rows * round(kept / info.keep_ratio),
        )

    def describe(self, metadata: Mapping[str, str], bits: int | None = None) -> list[str]:
        try:
            params = json.loads(metadata.get("deltadq", ""))
        except (TypeError, ValueError):
            return []
        parts = []
        if isinstance(params, dict) and params.get("bits") is not None:
            parts.append(f"{params['bits']}-bit")
        if isinstance(params, dict) and params.get("ratio") is not None:
            parts.append(f"ratio {params['ratio']}")
        return parts

    def reconstruct_blocks(
        self, delta: DeltaFile, name: str, base: torch.Tensor, dtype: torch.dtype
    ) -> Iterator[torch.Tensor]:
        from .. import deltadq

        return deltadq.reconstruct_blocks(
            base, delta.dq_codes(name), delta.dq_step(name), name, delta.dq_seed, delta.dq_params(name), dtype
        )

    def terms(self, delta: DeltaFile, name: str) -> tuple[Term, ...]:
        from ..terms import DeltaDQTerm

        return (DeltaDQTerm(name),)


CODEC = DeltaDQ()
