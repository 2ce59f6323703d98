"""Pure-torch reference of the multi-tenant sign-delta matmul (`sgmv.py`'s kernel): each slot's Δ̂
decoded densely and multiplied in fp32. The test oracle, and the torch backend's SGMV.
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
