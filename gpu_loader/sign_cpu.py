"""The CPU (torch backend) path of sign deltas: `x·Δ̂ᵀ` by byte-table look-up for the few tokens a
slot has per decode step, and the exact rebuild of a slot's weight for prefill-sized groups.
"""

from __future__ import annotations

import torch

from codec.bitdelta import pm1_lut


def reconstruct_words(
    base: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """`out ← (base.float() + Δ̂).to(out.dtype)` for a block of rows (words [P, rows, W], scales
    [P, rows | 1]), bit-identical to `codec.bitdelta.reconstruct`, in three passes over the block.

    `reconstruct` sums the planes onto +0.0; a first plane with scale 0 would give −0.0 here
    instead, which differs only for base values of −0.0, so those rows are set to +0.0 explicitly.
    """
    planes, rows, _ = words.shape
    inn = base.shape[1]
    lut = pm1_lut(words.device)
    delta = None
    for p in range(planes):
        by = words[p].contiguous().view(torch.uint8)
        pm1 = torch.nn.functional.embedding(by.to(torch.int32), lut).reshape(rows, -1)[:, :inn]
        s = scales[p].to(torch.float32).reshape(-1, 1)
        if delta is None:
            delta = pm1.mul(s)
            zero = s.reshape(-1) == 0
            if bool(zero.any()):
                delta[zero.expand(rows) if zero.numel() == 1 else zero] = 0.0
        else:
            delta.add_(pm1.mul_(s))
    return torch.add(delta, base, out=out)


def sign_matmul_lut(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`x·Δ̂ᵀ` in fp32 for one slot (words [P, out, W], scales [P, out | 1]) without decoding Δ̂.

    For every group of 8 input columns the 256 possible ±1 dot products of each token are
    tabulated once (`T[b·256 + v, n]`); each packed sign byte then selects its entry, so an output
    costs in/8 table look-ups instead of `in` multiply-adds, and no ±1 matrix is ever built.
    The CPU path for decode-sized token groups (the table grows with the tokens).
    """
    n, inn = x.shape
    planes, out, _ = words.shape
    nb = (inn + 7) // 8
    xp = torch.nn.functional.pad(x.float(), (0, nb * 8 - inn)).view(n, nb, 8)
    table = (xp @ pm1_lut(x.device).T).reshape(n, nb * 256).T.contiguous()  # [nb*256, n]
    offsets = torch.arange(nb, dtype=torch.int32, device=x.device) * 256
    y = torch.zeros(out, n, dtype=torch.float32, device=x.device)
    for p in range(planes):
        index = words[p].view(torch.uint8)[:, :nb].to(torch.int32) + offsets  # [out, nb]
        picked = torch.nn.functional.embedding(index, table)  # [out, nb, n]
        y += picked.sum(1) * scales[p].to(torch.float32).reshape(-1, 1)
    return y.T
