"""The per-tensor safety rule in compress: an encoding worse, by its codec's own error proxy, than
leaving the tensor at base (Δ̂ = 0) is not stored; the tensor stays at base and the file says so
(`x-fallbacks`, shown by inspect). Pairs whose encodings all beat "no delta" are unaffected."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from codec import deltadq
from codec.activations import InputMoments
from codec.apply import apply_delta
from codec.bitdelta import binarize, decode, reconstruct
from codec.checkpoint import Checkpoint
from codec.compress import CompressOptions, DeltaDQOptions, compress
from codec.format import DeltaFile
from codec.summary import summarize

NORMAL = "model.layers.0.mlp.up_proj.weight"
ADVERSARIAL = "model.layers.0.mlp.down_proj.weight"


def _pair(tmp_path, deltas: dict[str, torch.Tensor], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(d.shape, generator=gen) for n, d in deltas.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({n: base[n] + d for n, d in deltas.items()}, str(tmp_path / "ft.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors"


def _state(path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(path)
    return {n: ckpt.get(n) for n in ckpt.names}


def _signs(gen, shape) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen).float() * 2 - 1


def test_a_bitdelta_tensor_worse_than_no_delta_on_its_inputs_is_left_at_base(tmp_path):
    gen = torch.Generator().manual_seed(1)
    # Half the input columns change by ±1, half by ±0.001; the layer's inputs live on the second
    # half. One mean-|Δ| scale (≈ 0.5) then puts ±0.5 where the fine-tune changed ±0.001.
    adversarial = torch.cat([_signs(gen, (16, 32)), 1e-3 * _signs(gen, (16, 32))], dim=1)
    weight = torch.cat([torch.full((32,), 1e-6), torch.ones(32)])
    base_path, ft_path = _pair(
        tmp_path, {NORMAL: 0.02 * torch.randn(16, 64, generator=gen), ADVERSARIAL: adversarial}
    )
    moments = InputMoments(
        {NORMAL: torch.ones(64), ADVERSARIAL: weight}, tokens=64, data_fingerprint="sha256:" + "0" * 64
    )
    out = tmp_path / "d.bdelta"
    report = compress(base_path, ft_path, out, CompressOptions(base_name="org/tiny"), input_moments=moments)

    # The rule's decision, recomputed from the codec's math: E[x²]-weighted squared errors.
    base, ft = _state(base_path), _state(ft_path)
    for name, w in ((NORMAL, torch.ones(64)), (ADVERSARIAL, weight)):
        delta = ft[name] - base[name]
        sign, scale = binarize(ft[name], base[name])
        err = float((((delta - decode(sign, scale, 64)) ** 2) * w).sum())
        assert (err > float((delta**2 * w).sum())) == (name == ADVERSARIAL)

    assert list(report.fallbacks) == [ADVERSARIAL] and ADVERSARIAL in report.unchanged
    assert report.fallbacks[ADVERSARIAL].startswith("left at base: the bitdelta encoding's error is ")
    delta_file = DeltaFile.open(out)
    assert set(delta_file.entries) == {NORMAL}
    assert json.loads(delta_file.metadata["x-fallbacks"]) == report.fallbacks
    assert summarize(out)["fallbacks"] == report.fallbacks

    got = _state(apply_delta(base_path, out, tmp_path / "out").out_dir)
    assert torch.equal(got[ADVERSARIAL], base[ADVERSARIAL])
    assert torch.equal(
        got[NORMAL],
        reconstruct(base[NORMAL], delta_file.sign(NORMAL), delta_file.scale(NORMAL), torch.float32),
    )


def test_without_calibration_bitdelta_never_falls_back(tmp_path):
    """Its mean-|Δ| scale is the least-squares one for the signs: never worse than no delta."""
    gen = torch.Generator().manual_seed(2)
    adversarial = torch.cat([_signs(gen, (16, 32)), 1e-3 * _signs(gen, (16, 32))], dim=1)
    base_path, ft_path = _pair(tmp_path, {ADVERSARIAL: adversarial})
    report = compress(base_path, ft_path, tmp_path / "d.bdelta", CompressOptions(base_name="org/tiny"))
    assert report.fallbacks == {} and report.binarized == [ADVERSARIAL]


SHAPE = (1, 8)
DQ_PARAMS = deltadq.params_for(8, 8, 0.25, 4, 1)  # 8-bit codes, 1 column kept in each group of 4


def _keeps_column_0(seed: int) -> bool:
    return bool(deltadq.keep_mask(seed, ADVERSARIAL, SHAPE, DQ_PARAMS)[0, 0])


@pytest.mark.parametrize("seed", range(8))
def test_a_deltadq_tensor_whose_survivor_overshoots_the_delta_is_left_at_base(tmp_path, seed):
    """Only column 0 changes (by +1). Dropout keeps 1 column in 4 and multiplies it by 4: when
    column 0 survives, Δ̂ is ≈ 4Δ along Δ, worse than no delta (‖Δ − 4Δ‖² = 9‖Δ‖²); when it
    is dropped, Δ̂ holds only quantization noise orthogonal to Δ, no worse than none: kept."""
    delta = torch.zeros(SHAPE)
    delta[0, 0] = 1.0
    base_path, ft_path = _pair(tmp_path, {ADVERSARIAL: delta}, seed=seed)
    options = DeltaDQOptions(bits=8, keep=0.25, group_size=4, seed=seed)
    out = tmp_path / "q.bdelta"
    report = compress(base_path, ft_path, out, CompressOptions(codec=options, base_name="org/tiny"))
    overshoots = _keeps_column_0(seed)
    assert (ADVERSARIAL in report.fallbacks) == overshoots
    assert (ADVERSARIAL in DeltaFile.open(out).entries) == (not overshoots)
    if overshoots:
        assert report.fallbacks[ADVERSARIAL].startswith("left at base: the deltadq encoding's error is ")
        ratio = float(report.fallbacks[ADVERSARIAL].split(" is ")[1].split("x")[0])
        assert ratio == pytest.approx(9, rel=0.05)


def test_the_deltadq_cases_above_cover_both_outcomes():
    outcomes = {_keeps_column_0(s) for s in range(8)}
    assert outcomes == {True, False}


@pytest.mark.parametrize(
    "options",
    [
        CompressOptions(base_name="org/tiny"),
        CompressOptions(codec=DeltaDQOptions(ratio=16), base_name="org/tiny"),
    ],
    ids=["bitdelta", "deltadq-16x"],
)
def test_a_normal_pair_has_no_fallbacks(llama_pair, tmp_path, options):
    """On a real (tiny) fine-tune every encoding beats no delta: nothing changes, no key is
    written. (DeltaDQ's full squared error is above ‖Δ‖² on every one of these tensors: its
    proxy is the error along Δ.)"""
    base_dir, ft_dir = llama_pair
    report = compress(base_dir, ft_dir, tmp_path / "d.bdelta", options)
    delta = DeltaFile.open(report.path)
    assert report.fallbacks == {} and "x-fallbacks" not in delta.metadata
    assert summarize(report.path)["fallbacks"] == {}
    assert set(report.binarized) == {n for n, e in delta.entries.items() if e.kind != "full"}
