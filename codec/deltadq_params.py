"""DeltaDQ's per-tensor parameters (group size, kept per group, bits, parts) and their arithmetic:
no torch, so reading and validating a delta (codec.format) needs none."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import CodecError

MAX_BITS = 8


@dataclass(frozen=True)
class DQParams:
    """Per-tensor DeltaDQ parameters (stored in `N.dq_params` as int32 [group_size, keep, bits])."""

    group_size: int
    keep: int  # kept per full group
    bits: int
    parts: int = 1

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise CodecError(f"group size must be >= 1, got {self.group_size}")
        if not 1 <= self.keep <= self.group_size:
            raise CodecError(
                f"keep per group must be between 1 and the group size {self.group_size}, got {self.keep}"
            )
        if not 1 <= self.bits <= MAX_BITS:
            raise CodecError(f"bits must be between 1 and {MAX_BITS}, got {self.bits}")
        if self.parts < 1 or self.bits % self.parts:
            raise CodecError(f"parts must divide bits ({self.bits}), got {self.parts}")

    @property
    def part_bits(self) -> int:
        return self.bits // self.parts

    @property
    def keep_ratio(self) -> float:
        return self.keep / self.group_size

    def kept_per_row(self, in_features: int) -> int:
        full, last = divmod(in_features, self.group_size)
        return full * self.keep + (math.ceil(last * self.keep / self.group_size) if last else 0)

    def packed_width(self, in_features: int) -> int:
        return (self.kept_per_row(in_features) * self.part_bits + 7) // 8

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Stored bits per delta weight, including the per-row fp32 step."""
        payload = out_features * self.parts * self.packed_width(in_features) * 8 + 32 * out_features
        return payload / (out_features * in_features)
