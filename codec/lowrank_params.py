"""lowrank-mp's band table (which singular vectors are stored at how many bits, in which groups)
and its size arithmetic: no torch, so reading and validating a delta (codec.format) needs none."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import CodecError

MAX_BITS = 8
#: Bits of one group step (`N.lr_scales` is BF16), of one band-table row (I32 × 4) and of the
#: stored shape (`N.lr_shape`, I32 × 2).
STEP_BITS = 16
BAND_ROW_BITS = 4 * 32
SHAPE_BITS = 2 * 32


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of `count` codes of `bits` bits packed LSB-first, padded to a whole byte."""
    return (count * bits + 7) // 8


def groups(count: int, group_size: int) -> int:
    return -(-count // group_size)


@dataclass(frozen=True)
class Band:
    """Singular vectors `start … end − 1`, each factor row/column quantized to `bits` bits in
    groups of `group_size` consecutive elements (one `N.lr_bands` row)."""

    start: int
    end: int
    bits: int
    group_size: int

    @property
    def count(self) -> int:
        return self.end - self.start

    def code_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of this band's codes: per singular vector, its `a` row then its `b` column."""
        return self.count * (packed_bytes(in_features, self.bits) + packed_bytes(out_features, self.bits))

    def step_count(self, out_features: int, in_features: int) -> int:
        return self.count * (groups(in_features, self.group_size) + groups(out_features, self.group_size))


@dataclass(frozen=True)
class Layout:
    """A tensor's bands, contiguous from singular vector 0; the rank is the last band's end."""

    bands: tuple[Band, ...]

    @classmethod
    def from_counts(cls, counts: Iterable[tuple[int, int]], group_size: int) -> Layout:
        """`[(bits, count), …]` in rank order (zero counts skipped) -> contiguous bands."""
        bands, start = [], 0
        for bits, count in counts:
            if count > 0:
                bands.append(Band(start, start + count, bits, group_size))
                start += count
        return cls(tuple(bands))

    @classmethod
    def from_rows(
        cls, rows: Sequence[Sequence[int]], out_features: int | None = None, in_features: int | None = None
    ) -> Layout:
        """Parse and check `N.lr_bands` rows `(rank_start, rank_end, bits, group_size)` (the rank
        against the full rank only when the tensor's shape is given)."""
        layout = cls(tuple(Band(*(int(v) for v in row)) for row in rows))
        layout.check(out_features, in_features)
        return layout

    def rows(self) -> list[list[int]]:
        return [[b.start, b.end, b.bits, b.group_size] for b in self.bands]

    @property
    def rank(self) -> int:
        return self.bands[-1].end if self.bands else 0

    def check(self, out_features: int | None = None, in_features: int | None = None) -> None:
        """Raise CodecError unless the bands are contiguous from 0, non-empty, with 1–8 bits and a
        group size between 1 and 2^31 − 1, and (given the tensor's shape) within its full rank."""
        if not self.bands:
            raise CodecError("band table is empty (a low-rank tensor needs at least one band)")
        expected_start = 0
        for i, b in enumerate(self.bands):
            if b.start != expected_start:
                raise CodecError(
                    f"band {i} starts at singular vector {b.start}, expected {expected_start} "
                    "(bands must be contiguous from 0)"
                )
            if b.end <= b.start:
                raise CodecError(f"band {i} is empty or reversed: [{b.start}, {b.end})")
            if not 1 <= b.bits <= MAX_BITS:
                raise CodecError(f"band {i} has {b.bits} bits, expected 1 to {MAX_BITS}")
            if not 1 <= b.group_size < 2**31:
                raise CodecError(f"band {i} has group size {b.group_size}, expected >= 1")
            expected_start = b.end
        if out_features is None or in_features is None:
            return
        full_rank = min(out_features, in_features)
        if self.rank > full_rank:
            raise CodecError(
                f"rank {self.rank} exceeds the tensor's full rank {full_rank} ({out_features}x{in_features})"
            )

    def code_bytes(self, out_features: int, in_features: int) -> int:
        return sum(b.code_bytes(out_features, in_features) for b in self.bands)

    def step_count(self, out_features: int, in_features: int) -> int:
        return sum(b.step_count(out_features, in_features) for b in self.bands)

    def stored_bits(self, out_features: int, in_features: int) -> int:
        """Every stored bit of the tensor: codes, group steps, the band table and the shape."""
        return (
            8 * self.code_bytes(out_features, in_features)
            + STEP_BITS * self.step_count(out_features, in_features)
            + BAND_ROW_BITS * len(self.bands)
            + SHAPE_BITS
        )

    def describe(self) -> str:
        """`8b×2 + 3b×32 + 2b×120 (g64)`: the band split as people read it."""
        text = " + ".join(f"{b.bits}b×{b.count}" for b in self.bands)
        sizes = sorted({b.group_size for b in self.bands})
        return f"{text} (g{'/'.join(map(str, sizes))})"


def rank_cost_bits(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Stored bits of one singular vector pair at `bits` bits (codes and steps)."""
    return 8 * (packed_bytes(in_features, bits) + packed_bytes(out_features, bits)) + STEP_BITS * (
        groups(in_features, group_size) + groups(out_features, group_size)
    )


def budget_bits(out_features: int, in_features: int, ratio: float) -> int:
    """The tensor's budget at `ratio` vs fp16: floor(16·out·in / ratio) bits."""
    return int(16 * out_features * in_features // ratio)


def check_sizes(codes_len: int, steps_len: int, layout: Layout, out: int, inn: int) -> None:
    """The exact lengths `N.lr_codes` and `N.lr_scales` must have for `layout` on [out, in]."""
    want_codes, want_steps = layout.code_bytes(out, inn), layout.step_count(out, inn)
    if codes_len != want_codes:
        raise CodecError(f"lr_codes has {codes_len} bytes, the band table needs {want_codes}")
    if steps_len != want_steps:
        raise CodecError(f"lr_scales has {steps_len} steps, the band table needs {want_steps}")
