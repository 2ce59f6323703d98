"""Random sign deltas in the slot pool's layout, and the tolerance the loader's sign-delta paths
are held to against the dense reference (shared by the loader's tests and benches)."""

from __future__ import annotations

import torch

from codec.bitdelta import binarize
from gpu_loader.layout import pack_words

#: Kernel vs reference, per activation dtype: both accumulate in fp32 and round once, so they
#: differ by accumulation order (fp32) or by one rounding step of the output (fp16, bf16).
TOL = {
    torch.float32: dict(rtol=1e-5, atol_rel=1e-5),
    torch.float16: dict(rtol=1e-3, atol_rel=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol_rel=8e-3),
}


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    tol = TOL[ref.dtype]
    scale = ref.float().abs().max().item() + 1.0
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol["rtol"], atol=tol["atol_rel"] * scale)


def make_slots(n_slots: int, out: int, inn: int, planes: int, per_row: bool, seed: int = 0):
    """Packed words [S, P, out, W] and scales [S, P, out|1] of `n_slots` random deltas, and the
    file-format signs/scales they came from."""
    gen = torch.Generator().manual_seed(seed)
    mode = "per-row" if per_row else "per-matrix"
    signs, scales = [], []
    for _ in range(n_slots):
        s, c = binarize(torch.randn(out, inn, generator=gen), None, planes=planes, scale_mode=mode)
        signs.append(s)
        scales.append(c)
    words = torch.stack([pack_words(s) for s in signs])
    return words, torch.stack(scales), signs, scales
