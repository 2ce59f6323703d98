"""The forms a compressed delta tensor takes for its consumers (the loader's slots, merged mode,
evaluation): each codec describes a tensor's Δ̂ as a sum of terms from this short list, so a
consumer implements each term once and a new codec built from them needs no edit there.

    for term in entry_terms(delta, name):   # Δ̂ of `name` = the sum of its terms
        match term:
            case SignTerm(): ...             # BitDelta sign planes: the fused sign kernel
            case LowRankTerm(): ...          # b @ a: two skinny GEMMs (shrink, expand)
            case DeltaDQTerm(): ...          # DeltaDQ codes: decode rows, then GEMM
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import codecs

if TYPE_CHECKING:
    import torch

    from .format import DeltaFile


@dataclass(frozen=True)
class SignTerm:
    """Σ_p scale[p] · (2·bit − 1) over P sign planes, as docs/format.md `N.sign` / `N.scale`
    (U8 [P, out, ceil(in/8)] and F32 [P, 1] or [P, out]); read with `delta.tensor(key)`."""

    sign_key: str
    scale_key: str


@dataclass(frozen=True)
class LowRankTerm:
    """`b @ a` with a [rank, in] and b [out, rank]; `factors()` decodes them (fp32, on the CPU)
    from the file, bit-identical to what the codec's own decode multiplies."""

    rank: int
    factors: Callable[[], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DeltaDQTerm:
    """DeltaDQ codes of tensor `name` (docs/deltadq.md): `N.dq_codes`, `N.dq_step`, `N.dq_params`."""

    name: str


Term = SignTerm | LowRankTerm | DeltaDQTerm


def entry_terms(delta: DeltaFile, name: str) -> tuple[Term, ...]:
    """The terms whose sum is Δ̂ of compressed tensor `name` (a `.full` tensor has none: it
    replaces the base tensor instead of adding to it)."""
    entry = delta.entries[name]
    if entry.kind == "full":
        return ()
    return codecs.get(entry.kind).terms(delta, name)


__all__ = ["DeltaDQTerm", "LowRankTerm", "SignTerm", "Term", "entry_terms"]
