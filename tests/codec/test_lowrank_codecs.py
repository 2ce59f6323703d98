"""lowrank-mp and hybrid as codecs: compress → open → apply round trips on real safetensors files,
the per-tensor ratio promise, the terms a loader reads, the safety rule, and every malformed
low-rank tensor refused with its exact error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from codec import bitdelta
from codec.apply import apply_delta
from codec.checkpoint import Checkpoint
from codec.codecs.base import EncodeContext
from codec.codecs.hybrid import HybridOptions
from codec.codecs.lowrank_mp import CODEC as LOWRANK_MP
from codec.codecs.lowrank_mp import LowRankMPOptions
from codec.compress import CompressOptions, compress
from codec.errors import CodecError, IncompatibleDeltaError, InvalidDeltaError
from codec.format import DeltaFile
from codec.lowrank import ROW_BLOCK
from codec.lowrank_params import budget_bits
from codec.summary import summarize
from codec.terms import LowRankTerm, SignTerm, entry_terms
from tests.codec.test_lowrank import _numpy_decode

W = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def low_rank_pair(llama_pair, tmp_path_factory):
    """The tiny Llama base and a fine-tune whose block weights moved by a rank-6 delta (plus a
    little noise), as a fine-tune's delta does; norms changed too (kept dense)."""
    base_dir, _ = llama_pair
    root = tmp_path_factory.mktemp("low_rank_pair")
    ft_dir = root / "finetuned"
    shutil.copytree(base_dir, ft_dir)
    tensors = load_file(str(ft_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(11)
    for name, t in tensors.items():
        if t.dim() == 2 and "layers" in name:
            out, inn = t.shape
            u, v = torch.randn(out, 6, generator=gen), torch.randn(6, inn, generator=gen)
            scale = 0.02 * t.std() / 6**0.5
            tensors[name] = (
                t + scale * (u * torch.logspace(0, -1, 6)) @ v + 1e-4 * torch.randn(out, inn, generator=gen)
            )
        elif t.dim() == 1:
            tensors[name] = t + 0.01
    save_file(tensors, str(ft_dir / "model.safetensors"), metadata={"format": "pt"})
    return base_dir, ft_dir


def _stored_bits(delta: DeltaFile, name: str) -> int:
    return 8 * sum(p.nbytes for p in delta.entries[name].parts.values())


def _expected_weight(base: torch.Tensor, a: np.ndarray, b: np.ndarray, residual: torch.Tensor | None = None):
    """docs/lowrank.md's reconstruction, from independently decoded factors."""
    a_t, b_t = torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b))
    blocks = []
    for r in range(0, base.shape[0], ROW_BLOCK):
        d = torch.matmul(b_t[r : r + ROW_BLOCK], a_t)
        if residual is not None:
            d = d + residual[r : r + ROW_BLOCK]
        blocks.append((base[r : r + ROW_BLOCK].float() + d).to(base.dtype))
    return torch.cat(blocks)


@pytest.mark.parametrize("ratio", [8, 16, 32])
def test_lowrank_mp_round_trip_keeps_the_ratio_per_tensor(low_rank_pair, tmp_path, ratio):
    base_dir, ft_dir = low_rank_pair
    path = tmp_path / "d.bdelta"
    report = compress(base_dir, ft_dir, path, CompressOptions(codec=LowRankMPOptions(ratio=ratio)))
    delta = DeltaFile.open(path)
    assert delta.codec == "lowrank-mp" and report.binarized
    base, ft = Checkpoint.open(base_dir), Checkpoint.open(ft_dir)
    applied = Checkpoint.open(apply_delta(base_dir, path, tmp_path / "out").out_dir)
    for name in report.binarized:
        out, inn = base.entry(name).shape
        assert delta.entries[name].part("lr_codes") is not None, name  # a low-rank delta: no fallback
        assert _stored_bits(delta, name) <= budget_bits(out, inn, ratio), name
        a, b = _numpy_decode(
            delta.tensor(name + ".lr_codes").numpy(),
            delta.tensor(name + ".lr_scales").view(torch.int16).numpy().view(np.uint16),
            delta.tensor(name + ".lr_bands").numpy(),
            out,
            inn,
        )
        assert torch.equal(applied.get(name), _expected_weight(base.get(name), a, b)), name
        # Closer to the fine-tune than 1-bit signs (which cost 16x): the delta is low-rank.
        d = ft.get(name).float() - base.get(name).float()
        err = float((applied.get(name).float() - ft.get(name).float()).pow(2).sum())
        assert err < float(
            (bitdelta.decode(*bitdelta.binarize(ft.get(name), base.get(name)), inn) - d).pow(2).sum()
        )
    for name in report.dense:
        assert torch.equal(applied.get(name), ft.get(name))


def test_lowrank_mp_terms_give_the_factors_apply_multiplies(low_rank_pair, tmp_path):
    base_dir, ft_dir = low_rank_pair
    path = tmp_path / "d.bdelta"
    compress(base_dir, ft_dir, path, CompressOptions(codec=LowRankMPOptions(ratio=16)))
    delta = DeltaFile.open(path)
    base = Checkpoint.open(base_dir)
    applied = Checkpoint.open(apply_delta(base_dir, path, tmp_path / "out").out_dir)
    (term,) = entry_terms(delta, W)
    assert isinstance(term, LowRankTerm)
    a, b = term.factors()
    assert a.dtype == b.dtype == torch.float32 and a.shape[0] == b.shape[1] == term.rank
    assert torch.equal(applied.get(W), _expected_weight(base.get(W), a.numpy(), b.numpy()))
    info = summarize(path)
    row = next(t for t in info["tensors"] if t["name"] == W)
    assert row["kind"] == "lowrank-mp" and row["form"] == "low rank" and row["rank"] == term.rank
    assert info["counts"]["lowrank-mp"] == 14


@pytest.mark.parametrize(
    ("options", "planes"),
    [
        (HybridOptions(rank=4), 1),
        (HybridOptions(ratio=8), 1),
        (HybridOptions(rank=3, planes=2, scale_mode="per-row"), 2),
    ],
)
def test_hybrid_round_trip_and_terms(low_rank_pair, tmp_path, options, planes):
    base_dir, ft_dir = low_rank_pair
    path = tmp_path / "d.bdelta"
    report = compress(base_dir, ft_dir, path, CompressOptions(codec=options))
    delta = DeltaFile.open(path)
    base = Checkpoint.open(base_dir)
    applied = Checkpoint.open(apply_delta(base_dir, path, tmp_path / "out").out_dir)
    for name in report.binarized:
        out, inn = base.entry(name).shape
        if options.ratio is not None:
            assert _stored_bits(delta, name) <= budget_bits(out, inn, options.ratio), name
        lr, signs = entry_terms(delta, name)
        assert isinstance(lr, LowRankTerm) and isinstance(signs, SignTerm)
        assert signs == SignTerm(name + ".sign", name + ".scale")  # the sign kernel's own tensors
        assert delta.tensor(signs.sign_key).shape[0] == planes
        a, b = lr.factors()
        assert torch.equal(a, delta.tensor(name + ".lr_a").float())
        residual = bitdelta.decode(delta.sign(name), delta.scale(name), inn)
        want = _expected_weight(base.get(name), a.numpy(), b.numpy(), residual)
        assert torch.equal(applied.get(name), want), name
    if options.rank is not None:
        assert delta.tensor(W + ".lr_a").shape[0] == options.rank


def test_hybrid_rank_is_capped_at_a_tensors_full_rank(low_rank_pair, tmp_path):
    base_dir, ft_dir = low_rank_pair
    path = tmp_path / "d.bdelta"
    report = compress(base_dir, ft_dir, path, CompressOptions(codec=HybridOptions(rank=100)))
    delta = DeltaFile.open(path)
    for name in report.binarized:
        shape = Checkpoint.open(base_dir).entry(name).shape
        assert delta.tensor(name + ".lr_a").shape[0] == min(100, *shape)


def test_safety_rule_stores_signs_where_they_are_closer_and_says_why(llama_pair):
    """The plain tiny pair's deltas are iid noise: 1-bit signs beat any rank at 16x."""
    base_dir, ft_dir = llama_pair
    base, ft = Checkpoint.open(base_dir), Checkpoint.open(ft_dir)
    enc = LOWRANK_MP.encode(ft.get(W), base.get(W), W, LowRankMPOptions(ratio=16), EncodeContext())
    assert [p.kind for p in enc.pieces] == ["sign", "scale"]
    sign, scale = bitdelta.binarize(ft.get(W), base.get(W))
    assert torch.equal(enc.pieces[0].tensor, sign) and torch.equal(enc.pieces[1].tensor, scale)
    assert enc.fallback.startswith("1-bit signs: error ") and "< low rank" in enc.fallback
    assert enc.stats.squared_error == pytest.approx(
        float((bitdelta.decode(sign, scale, 64) - (ft.get(W) - base.get(W))).pow(2).sum()), rel=1e-5
    )
    without = LOWRANK_MP.encode(
        ft.get(W), base.get(W), W, LowRankMPOptions(ratio=16, signs=False), EncodeContext()
    )
    assert without.fallback is None and without.pieces[0].kind == "lr_codes"


def test_a_fallback_tensor_round_trips_as_signs(llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    path = tmp_path / "d.bdelta"
    report = compress(base_dir, ft_dir, path, CompressOptions(codec=LowRankMPOptions(ratio=16)))
    delta = DeltaFile.open(path)
    kinds = {tuple(sorted(delta.entries[n].parts)) for n in report.binarized}
    assert ("scale", "sign") in kinds
    # Every tensor stored as signs is recorded, with both errors, in x-fallbacks.
    as_signs = {n for n in report.binarized if delta.entries[n].part("sign") is not None}
    recorded = json.loads(delta.metadata["x-fallbacks"])
    assert set(recorded) == as_signs == set(report.fallbacks)
    assert all(r.startswith("1-bit signs: error ") and "at ratio 16" in r for r in recorded.values())
    applied = Checkpoint.open(apply_delta(base_dir, path, tmp_path / "out").out_dir)
    base = Checkpoint.open(base_dir)
    name = next(n for n in report.binarized if delta.entries[n].part("sign") is not None)
    assert entry_terms(delta, name) == (SignTerm(name + ".sign", name + ".scale"),)
    want = bitdelta.reconstruct(base.get(name), delta.sign(name), delta.scale(name), torch.float32)
    assert torch.equal(applied.get(name), want)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "lowrank-mp needs --ratio"),
        ({"ratio": 1.5}, "ratio must be between 2 and 16384, got 1.5"),
        ({"ratio": 16, "group_size": 0}, "group size must be >= 1, got 0"),
    ],
)
def test_bad_lowrank_mp_options(kwargs, message):
    with pytest.raises(CodecError, match=message):
        LowRankMPOptions(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "hybrid needs exactly one of --rank and --ratio"),
        ({"rank": 4, "ratio": 8}, "hybrid needs exactly one of --rank and --ratio"),
        ({"rank": 0}, "rank must be between 1 and 1048576, got 0"),
        (
            {"ratio": 16},
            r"hybrid --ratio must be above 1 and below 16 \(1 sign plane\(s\) alone are 16x\), got 16",
        ),
        ({"ratio": 10, "planes": 2}, "below 8 .*got 10"),
        ({"rank": 4, "planes": 9}, "bits/planes must be between 1 and 8, got 9"),
        ({"rank": 4, "scale_mode": "per-col"}, "scale mode must be 'per-matrix' or 'per-row', got 'per-col'"),
    ],
)
def test_bad_hybrid_options(kwargs, message):
    with pytest.raises(CodecError, match=message):
        HybridOptions(**kwargs)


def test_a_hybrid_ratio_with_no_room_for_rank_one_is_refused(low_rank_pair, tmp_path):
    base_dir, ft_dir = low_rank_pair
    with pytest.raises(CodecError, match=r"ratio 15.9 leaves no room for a rank-1 part in a \d+x\d+ tensor"):
        compress(base_dir, ft_dir, tmp_path / "d.bdelta", CompressOptions(codec=HybridOptions(ratio=15.9)))
    assert not (tmp_path / "d.bdelta").exists()


# --- malformed files ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lr_files(low_rank_pair, tmp_path_factory):
    base_dir, ft_dir = low_rank_pair
    root = tmp_path_factory.mktemp("lr_files")
    out = {}
    for label, options in (("lowrank-mp", LowRankMPOptions(ratio=16)), ("hybrid", HybridOptions(rank=4))):
        compress(base_dir, ft_dir, root / f"{label}.bdelta", CompressOptions(codec=options))
        delta = DeltaFile.open(root / f"{label}.bdelta")
        out[label] = (dict(delta.metadata), {k: delta.tensor(k).clone() for k in delta.header.tensors})
    return out


def _rewritten(lr_files, codec, tmp_path, change):
    metadata, tensors = lr_files[codec]
    metadata, tensors = dict(metadata), {k: t.clone() for k, t in tensors.items()}  # changes stay local
    change(metadata, tensors)
    path = tmp_path / "bad.bdelta"
    save_file(tensors, str(path), metadata=metadata)
    return path


def _set(key, value):
    def change(meta, tensors):
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value

    return change


def _bands(*rows):
    return _set(W + ".lr_bands", torch.tensor(rows, dtype=torch.int32))


@pytest.mark.parametrize(
    ("codec", "change", "message"),
    [
        ("lowrank-mp", _set(W + ".lr_bands", None), r"lowrank-mp tensor needs .* \(missing lr_bands\)"),
        (
            "lowrank-mp",
            _set(W + ".lr_codes", torch.zeros(2, 3, dtype=torch.uint8)),
            r"\.lr_codes must be U8 \[bytes\], got U8\[2, 3\]",
        ),
        (
            "lowrank-mp",
            _set(W + ".lr_scales", torch.zeros(8)),
            r"\.lr_scales must be BF16 \[groups\], got F32\[8\]",
        ),
        (
            "lowrank-mp",
            _set(W + ".lr_bands", torch.zeros(2, 3, dtype=torch.int32)),
            r"\.lr_bands must be I32 \[1 to 64 bands, 4\]",
        ),
        (
            "lowrank-mp",
            _set(W + ".lr_shape", torch.zeros(3, dtype=torch.int32)),
            r"\.lr_shape must be I32 \[2\] \(out, in\), got I32\[3\]",
        ),
        (
            "lowrank-mp",
            _set(W + ".lr_shape", torch.tensor([0, 64], dtype=torch.int32)),
            r"lr_shape: \(0, 64\) is not a tensor shape",
        ),
        ("lowrank-mp", _bands([0, 4, 9, 128]), f"{W}: band 0 has 9 bits, expected 1 to 8"),
        ("lowrank-mp", _bands([2, 4, 3, 128]), f"{W}: band 0 starts at singular vector 2, expected 0"),
        ("lowrank-mp", _bands([0, 65, 2, 128]), f"{W}: rank 65 exceeds the tensor's full rank 64"),
        ("lowrank-mp", _bands([0, 4, 2, 128]), f"{W}: lr_codes has \\d+ bytes, the band table needs 248"),
        (
            "lowrank-mp",
            lambda meta, t: t[W + ".lr_scales"].__setitem__(0, float("inf")),
            f"{W}.lr_scales contains NaN or Inf",
        ),
        (
            "lowrank-mp",
            lambda meta, t: meta.__setitem__("lowrank", "[1]"),
            "metadata 'lowrank' must be a JSON object",
        ),
        (
            "lowrank-mp",
            _set(W + ".lr_a", torch.zeros(2, 64, dtype=torch.float16)),
            r"\.lr_a tensors in a 'lowrank-mp' delta",
        ),
        ("hybrid", _set(W + ".lr_b", None), r"hybrid tensor needs .* \(missing lr_b\)"),
        ("hybrid", _set(W + ".scale", None), r"hybrid tensor needs .* \(missing scale\)"),
        (
            "hybrid",
            _set(W + ".lr_a", torch.zeros(4, 64)),
            r"\.lr_a must be F16 \[rank >= 1, in\], got F32\[4, 64\]",
        ),
        (
            "hybrid",
            _set(W + ".lr_b", torch.zeros(184, 5, dtype=torch.float16)),
            r"\.lr_b must be F16 \[184, 4\] \(out rows of \.sign, rank of \.lr_a\), got F16\[184, 5\]",
        ),
        (
            "hybrid",
            lambda meta, t: t[W + ".lr_a"].__setitem__((0, 0), float("nan")),
            f"{W}.lr_a contains NaN or Inf",
        ),
        (
            "hybrid",
            _set(W + ".lr_codes", torch.zeros(4, dtype=torch.uint8)),
            r"\.lr_codes tensors in a 'hybrid' delta",
        ),
    ],
)
def test_malformed_low_rank_tensors_are_refused_on_open(lr_files, tmp_path, codec, change, message):
    with pytest.raises(InvalidDeltaError, match=message):
        DeltaFile.open(_rewritten(lr_files, codec, tmp_path, change))


Q = "model.layers.0.self_attn.q_proj.weight"  # [64, 64]


def _parts_of_q_under_w(meta, tensors):
    """W's low-rank parts replaced by q_proj's: a file consistent in itself, wrong for the base."""
    for kind in ("lr_codes", "lr_scales", "lr_bands", "lr_shape"):
        tensors[f"{W}.{kind}"] = tensors[f"{Q}.{kind}"].clone()


@pytest.mark.parametrize(
    ("codec", "change", "message"),
    [
        (
            "lowrank-mp",
            _parts_of_q_under_w,
            rf"{W}.lr_shape is \[64, 64\] but the base tensor is \[184, 64\]",
        ),
        (
            "hybrid",
            _set(W + ".lr_a", torch.zeros(4, 65, dtype=torch.float16)),
            rf"{W}.lr_a has shape \[4, 65\] but base shape \[184, 64\] needs \[4, 64\]",
        ),
    ],
)
def test_low_rank_tensors_that_do_not_fit_the_base_are_refused_before_writing(
    lr_files, low_rank_pair, tmp_path, codec, change, message
):
    base_dir, _ = low_rank_pair
    path = _rewritten(lr_files, codec, tmp_path, change)
    DeltaFile.open(path)  # valid in itself
    with pytest.raises(IncompatibleDeltaError, match=message):
        apply_delta(base_dir, path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hybrid_rank_above_the_base_tensors_full_rank_is_refused(lr_files, low_rank_pair, tmp_path):
    base_dir, _ = low_rank_pair

    def change(meta, tensors):
        tensors[Q + ".lr_a"] = torch.zeros(65, 64, dtype=torch.float16)
        tensors[Q + ".lr_b"] = torch.zeros(64, 65, dtype=torch.float16)

    with pytest.raises(
        IncompatibleDeltaError, match=rf"{Q}.lr_a: rank 65 exceeds the full rank 64 of the base"
    ):
        apply_delta(base_dir, _rewritten(lr_files, "hybrid", tmp_path, change), tmp_path / "out")
    assert not (tmp_path / "out").exists()
