"""DeltaDQ: reproducible mask, round trips at each ratio, error vs keep, metadata validation."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from codec import deltadq
from codec.apply import apply_delta
from codec.checkpoint import Checkpoint
from codec.compress import CompressOptions, DeltaDQOptions, compress
from codec.deltadq import DQParams, decode, encode, keep_mask, splitmix64
from codec.errors import CodecError, InvalidDeltaError, UnsupportedFormatError
from codec.format import DeltaFile
from codec.summary import summarize


def test_splitmix64_reference_values():
    # SplitMix64 seeded with 0: the well-known first outputs of the generator.
    state = np.array([0, 0x9E3779B97F4A7C15, 2 * 0x9E3779B97F4A7C15 % 2**64], dtype=np.uint64)
    assert [hex(int(v)) for v in splitmix64(state)] == [
        "0xe220a8397b1dcdaf",
        "0x6e789e6aa1b965f4",
        "0x6c45d188009454f",
    ]


def test_mask_golden():
    """The same mask on every run and machine: a fixed digest of the packed mask bits."""
    mask = keep_mask(
        1234, "model.layers.0.mlp.up_proj.weight", (64, 100), DQParams(group_size=16, keep=4, bits=2)
    )
    digest = hashlib.sha256(np.packbits(mask, axis=-1, bitorder="little").tobytes()).hexdigest()
    assert mask.sum(axis=1).tolist() == [6 * 4 + 1] * 64  # 6 full groups + ceil(4·4/16) in the last 4 columns
    assert digest == GOLDEN_MASK_DIGEST
    # Row ranges give the same rows as the whole.
    part = keep_mask(1234, "model.layers.0.mlp.up_proj.weight", (64, 100), DQParams(16, 4, 2), slice(10, 20))
    assert np.array_equal(part, mask[10:20])


GOLDEN_MASK_DIGEST = "efb0ff40082f092296ad043c6dffacac7129afe74a46a3253bfaeaf5aff3fb06"


def _py_splitmix64(x: int) -> int:
    m = 2**64 - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_mask_matches_the_documented_algorithm():
    """An independent pure-Python reading of docs/deltadq.md gives the same mask."""
    seed, name, out, inn, g, k = 77, "model.layers.3.self_attn.q_proj.weight", 5, 37, 8, 3
    key = _py_splitmix64(seed ^ int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))
    want = np.zeros((out, inn), dtype=bool)
    for o in range(out):
        for j in range((inn + g - 1) // g):
            length = min(g, inn - j * g)
            kept = k if length == g else -(-length * k // g)
            gk = _py_splitmix64(key ^ ((o << 32) | j))
            perm = list(range(length))
            for t in range(kept):
                pick = t + _py_splitmix64((gk + t * 0x9E3779B97F4A7C15) % 2**64) % (length - t)
                perm[t], perm[pick] = perm[pick], perm[t]
            for c in perm[:kept]:
                want[o, j * g + c] = True
    assert np.array_equal(keep_mask(seed, name, (out, inn), DQParams(g, k, 1)), want)


def test_mask_depends_on_seed_and_name():
    p = DQParams(16, 4, 2)
    a = keep_mask(1, "w", (8, 64), p)
    assert not np.array_equal(a, keep_mask(2, "w", (8, 64), p))
    assert not np.array_equal(a, keep_mask(1, "v", (8, 64), p))
    # Exactly `keep` per full group.
    assert (a.reshape(8, 4, 16).sum(-1) == 4).all()


@pytest.mark.parametrize("bits,parts", [(1, 1), (2, 1), (2, 2), (4, 2), (8, 4)])
@pytest.mark.parametrize("in_features", [1, 7, 33, 100])
def test_encode_decode_round_trip(bits, parts, in_features):
    g = torch.Generator().manual_seed(in_features)
    base = torch.randn(9, in_features, generator=g)
    ft = base + 0.05 * torch.randn(9, in_features, generator=g)
    p = DQParams(
        group_size=min(16, in_features), keep=max(1, min(16, in_features) // 4), bits=bits, parts=parts
    )
    codes, step = encode(ft, base, "t", 5, p)
    assert codes.shape == (parts, 9, p.packed_width(in_features)) and step.shape == (9,)
    d = decode(codes, step, "t", 5, p, in_features)
    mask = torch.from_numpy(keep_mask(5, "t", (9, in_features), p))
    assert (d[~mask] == 0).all()
    # Surviving values take only 2^bits levels per row, symmetric around zero.
    for row in range(9):
        levels = torch.unique(d[row][mask[row]])
        assert len(levels) <= 2**bits
        centre = (2**bits - 1) / 2
        codes_back = levels / step[row] + centre
        assert torch.allclose(codes_back, codes_back.round(), atol=1e-3)


def test_eight_bits_and_full_keep_is_nearly_exact():
    base = torch.randn(16, 64)
    ft = base + 0.01 * torch.randn(16, 64)
    p = DQParams(group_size=16, keep=16, bits=8)
    d = decode(*encode(ft, base, "t", 0, p), "t", 0, p, 64)
    assert torch.allclose(d, ft - base, atol=2e-4)


def test_error_decreases_as_keep_grows():
    """On a structured delta (low rank, as fine-tunes are), keeping more weights loses less."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(128, 256, generator=g)
    delta = (torch.randn(128, 4, generator=g) @ torch.randn(4, 256, generator=g)) * 0.01
    ft = base + delta
    errors = []
    for keep in (2, 4, 8, 16):
        p = DQParams(group_size=16, keep=keep, bits=4)
        d = decode(*encode(ft, base, "t", 3, p), "t", 3, p, 256)
        errors.append(float((d - delta).norm() / delta.norm()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.1


@pytest.fixture(scope="module")
def wide_pair(tmp_path_factory):
    """A one-layer Llama 512 wide: wide enough for 128x once the per-row step is counted."""
    from tests.support.model_pairs import make_llama_pair

    return make_llama_pair(tmp_path_factory.mktemp("wide_pair"), seed=4, hidden=512, layers=1)


@pytest.mark.parametrize("ratio", [16, 32, 64, 128])
def test_compress_apply_round_trip_at_each_ratio(wide_pair, tmp_path, ratio):
    base_dir, ft_dir = wide_pair
    path = tmp_path / "d.bdelta"
    report = compress(base_dir, ft_dir, path, CompressOptions(codec=DeltaDQOptions(ratio=ratio, seed=9)))
    delta = DeltaFile.open(path)
    assert delta.codec == "deltadq" and json.loads(delta.metadata["deltadq"])["seed"] == 9
    info = summarize(path)
    assert info["counts"]["deltadq"] == len(report.binarized) > 0
    # The ratio is kept: every compressed tensor, per-row step included, takes at most 16/ratio
    # bits per weight, and the search spends most of that budget.
    for name in report.binarized:
        out_f, in_f = Checkpoint.open(base_dir).entry(name).shape
        assert 0.6 * 16 / ratio < delta.dq_params(name).bits_per_weight(out_f, in_f) <= 16 / ratio, name
    assert info["bits_per_binarized_weight"] <= 16 / ratio * 1.001  # + each tensor's 16-byte dq_params
    out = apply_delta(base_dir, path, tmp_path / "out").out_dir
    got, base, ft = Checkpoint.open(out), Checkpoint.open(base_dir), Checkpoint.open(ft_dir)
    for name in report.binarized:
        p = delta.dq_params(name)
        want = (
            base.get(name).float()
            + decode(delta.dq_codes(name), delta.dq_step(name), name, 9, p, base.entry(name).shape[1])
        ).to(torch.float32)
        assert torch.equal(got.get(name), want), name
    for name in report.dense:
        assert torch.equal(got.get(name), ft.get(name))


def test_ratio_choice_and_explicit_parameters(llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    path = tmp_path / "d.bdelta"
    compress(
        base_dir,
        ft_dir,
        path,
        CompressOptions(codec=DeltaDQOptions(bits=4, keep=0.25, group_size=32, parts=2)),
    )
    delta = DeltaFile.open(path)
    for name, e in delta.entries.items():
        if e.kind == "deltadq":
            p = delta.dq_params(name)
            assert (p.group_size, p.keep, p.bits, p.parts) == (32, 8, 4, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs --ratio"),
        ({"ratio": 8}, "between 16 and 16384"),
        ({"ratio": 32, "bits": 2}, "not both"),
        ({"bits": 9, "keep": 0.5}, "bits must be between 1 and 8"),
        ({"bits": 2, "keep": 0.0}, "keep ratio must be in"),
        ({"bits": 2, "keep": 0.01, "group_size": 16}, "keeps nothing"),
        ({"bits": 3, "keep": 0.5, "parts": 2}, "divide the bits"),
        ({"ratio": 32, "group_size": 0}, "group size must be >= 1"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(CodecError, match=message):
        DeltaDQOptions(**kwargs)


@pytest.fixture(scope="module")
def dq_file(llama_pair, tmp_path_factory):
    base_dir, ft_dir = llama_pair
    path = tmp_path_factory.mktemp("dq") / "d.bdelta"
    compress(base_dir, ft_dir, path, CompressOptions(codec=DeltaDQOptions(bits=1, keep=0.5)))
    delta = DeltaFile.open(path)
    tensors = {k: delta.tensor(k).clone() for k in delta.header.tensors}
    return dict(delta.metadata), tensors


def _rewrite(tmp_path, metadata, tensors):
    from tests.codec.test_validation import _write

    return _write(tmp_path / "bad.bdelta", tensors, metadata)


W = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize(
    ("meta_change", "tensor_change", "error", "message"),
    [
        ({"deltadq": None}, {}, InvalidDeltaError, "needs a 'deltadq' metadata key"),
        (
            {"deltadq": json.dumps({"seed": -1, "mask": "splitmix64-v1"})},
            {},
            InvalidDeltaError,
            "integer 'seed'",
        ),
        (
            {"deltadq": json.dumps({"seed": 1, "mask": "mt19937"})},
            {},
            UnsupportedFormatError,
            "mask algorithm",
        ),
        (
            {},
            {W + ".dq_params": torch.tensor([0, 1, 2], dtype=torch.int32)},
            InvalidDeltaError,
            "group size must be >= 1",
        ),
        (
            {},
            {W + ".dq_params": torch.tensor([16, 17, 2], dtype=torch.int32)},
            InvalidDeltaError,
            "keep per group",
        ),
        (
            {},
            {W + ".dq_params": torch.tensor([16, 4, 12], dtype=torch.int32)},
            InvalidDeltaError,
            "bits must be between",
        ),
        (
            {},
            {W + ".dq_params": torch.tensor([16, 4, 2], dtype=torch.int64)},
            InvalidDeltaError,
            "must be I32",
        ),
        ({}, {W + ".dq_step": torch.full((184,), float("nan"))}, InvalidDeltaError, "NaN or Inf"),
        ({}, {W + ".dq_step": None}, InvalidDeltaError, "missing dq_step"),
        (
            {},
            {W + ".sign": torch.zeros(1, 184, 8, dtype=torch.uint8)},
            InvalidDeltaError,
            "weight: .sign tensors in a 'deltadq' delta",
        ),
        (
            {"codec": "bitdelta"},
            {},
            InvalidDeltaError,
            "weight: .dq_codes/.dq_step/.dq_params tensors in a 'bitdelta' delta",
        ),
    ],
)
def test_bad_deltadq_files(dq_file, tmp_path, meta_change, tensor_change, error, message):
    metadata, tensors = dq_file
    metadata, tensors = dict(metadata), dict(tensors)
    for k, v in meta_change.items():
        if v is None:
            metadata.pop(k)
        else:
            metadata[k] = v
    for k, v in tensor_change.items():
        if v is None:
            tensors.pop(k)
        else:
            tensors[k] = v
    with pytest.raises(error, match=message):
        DeltaFile.open(_rewrite(tmp_path, metadata, tensors))


def test_codes_shape_checked_against_base(llama_pair, dq_file, tmp_path):
    base_dir, _ = llama_pair
    metadata, tensors = dq_file
    codes = tensors[W + ".dq_codes"]
    tensors = {
        **tensors,
        W + ".dq_codes": torch.zeros(codes.shape[0], codes.shape[1], codes.shape[2] + 1, dtype=torch.uint8),
    }
    from codec.errors import IncompatibleDeltaError

    with pytest.raises(IncompatibleDeltaError, match="dq_codes has shape"):
        apply_delta(base_dir, _rewrite(tmp_path, metadata, tensors), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_deltadq(wide_pair, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    base_dir, ft_dir = wide_pair
    res = CliRunner().invoke(
        app,
        [
            "compress",
            str(base_dir),
            str(ft_dir),
            "-o",
            str(tmp_path / "d.bdelta"),
            "--base-name",
            "org/tiny",
            "--codec",
            "deltadq",
            "--ratio",
            "64",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "d.bdelta"), "--json"])
    assert json.loads(res.stdout)["codec"] == "deltadq"
    res = CliRunner().invoke(
        app,
        [
            "compress",
            str(base_dir),
            str(ft_dir),
            "-o",
            str(tmp_path / "e.bdelta"),
            "--base-name",
            "org/tiny",
            "--codec",
            "deltadq",
            "--group-size",
            "big",
            "--ratio",
            "32",
        ],
    )
    assert res.exit_code == 2 and "--group-size" in res.output
    res = CliRunner().invoke(
        app,
        [
            "compress",
            str(base_dir),
            str(ft_dir),
            "-o",
            str(tmp_path / "e.bdelta"),
            "--base-name",
            "org/tiny",
            "--codec",
            "zip",
        ],
    )
    assert res.exit_code == 7 and "codec must be" in res.output
    assert not (tmp_path / "e.bdelta").exists()


def test_candidates_for_ratio_spend_the_budget():
    for ratio in (16, 32, 64, 128):
        for bits, keep in deltadq.candidates_for_ratio(ratio):
            assert bits * keep == pytest.approx(16 / ratio)
        for bits, keep in deltadq.candidates_for_ratio(ratio, 4096):
            assert bits * keep == pytest.approx(16 / ratio - 32 / 4096)


def test_a_ratio_out_of_reach_for_a_narrow_tensor_is_refused(llama_pair, tmp_path):
    with pytest.raises(
        CodecError, match=r"ratio 64 is out of reach for a tensor 64 wide: .*at most ratio 32"
    ):
        deltadq.candidates_for_ratio(64, 64)
    base_dir, ft_dir = llama_pair  # 64 wide
    with pytest.raises(CodecError, match="out of reach"):
        compress(base_dir, ft_dir, tmp_path / "d.bdelta", CompressOptions(codec=DeltaDQOptions(ratio=32)))
    assert not list(tmp_path.iterdir())
