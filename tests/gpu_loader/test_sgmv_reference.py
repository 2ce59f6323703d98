"""The pure-torch SGMV reference against a per-token dense oracle built from the codec's decoder."""

from __future__ import annotations

import torch

from codec.bitdelta import decode
from gpu_loader.segments import build_segments
from gpu_loader.sgmv_reference import sgmv_sign_reference
from tests.support.sign_slots import make_slots


def test_reference_equals_per_token_dense_oracle():
    out, inn = 13, 37
    words, scales, signs, file_scales = make_slots(3, out, inn, planes=2, per_row=True)
    rows = [2, -1, 0, 2, 1]
    x = torch.randn(len(rows) * 2, inn)
    y0 = torch.randn(len(rows) * 2, out)
    y = sgmv_sign_reference(x, y0.clone(), words, scales, build_segments(rows, 2, x.device))
    for t in range(x.shape[0]):
        slot = rows[t // 2]
        want = y0[t] if slot < 0 else y0[t] + x[t] @ decode(signs[slot], file_scales[slot], inn).T
        torch.testing.assert_close(y[t], want, rtol=1e-6, atol=1e-5)
