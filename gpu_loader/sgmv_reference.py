"""Pure-torch references of the multi-tenant delta matmuls: the sign kernel (`sgmv.py`: each slot's
Δ̂ decoded densely) and the low-rank pair (`sgmv_lowrank.py`: per-slot shrink and expand GEMMs),
in fp32. The test oracles, and the torch backend's SGMV.
"""

from __future__ import annotations

import torch

from .layout import decode_words
from .segments import Segments


def sgmv_sign_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    segments: Segments,
    slots: list[int] | None = None,
) -> torch.Tensor:
    """`y[t] += x[t]·Δ̂[slot(t)]ᵀ` for the tokens of `slots` (default: every slot in `segments`),
    in fp32, rounded once to y's dtype. Modifies and returns `y`."""
    in_features = x.shape[1]
    for slot in segments.slot_tokens if slots is None else slots:
        tokens = segments.slot_tokens.get(slot)
        if tokens is None:
            continue
        delta = decode_words(words[slot], scales[slot], in_features)
        y[tokens] = (y[tokens].float() + x[tokens].float() @ delta.T).to(y.dtype)
    return y


def lowrank_add_(
    y: torch.Tensor, x: torch.Tensor, tokens: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> None:
    """`y[tokens] += (x[tokens]·aᵀ)·bᵀ` for one slot's factors (a [r, in], b [out, r]): two skinny
    GEMMs in fp32, rounded once to y's dtype."""
    xa = x[tokens].float() @ a.float().T
    y[tokens] = (y[tokens].float() + xa @ b.float().T).to(y.dtype)


def sgmv_lowrank_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ranks: torch.Tensor,
    segments: Segments,
    slots: list[int] | None = None,
) -> torch.Tensor:
    """`y[t] += (x[t]·a[s, :r]ᵀ)·b[s, :, :r]ᵀ` for the tokens of `slots` (default: every slot in
    `segments`), r = ranks[s] (0: nothing), in fp32. Modifies and returns `y`."""
    for slot in segments.slot_tokens if slots is None else slots:
        tokens = segments.slot_tokens.get(slot)
        rank = int(ranks[slot]) if tokens is not None else 0
        if rank:
            lowrank_add_(y, x, tokens, a[slot, :rank], b[slot, :, :rank])
    return y
