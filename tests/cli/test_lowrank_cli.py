"""`deltactl compress --codec lowrank-mp | hybrid` on real safetensors files: the flags reach the
codec, inspect shows the bands/rank, apply rebuilds what the file decodes to, calibration steers
lowrank-mp's search and distils hybrid's scales, and bad flags fail with nothing written."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app
from codec import codecs
from codec.checkpoint import Checkpoint
from codec.format import DeltaFile
from codec.lowrank_params import budget_bits
from tests.support.model_pairs import make_llama_pair, save_byte_tokenizer

runner = CliRunner()


def deltactl(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny tied Llama and a fine-tune whose block weights moved by a rank-4 delta; with a
    tokenizer and calibration text, so both calibration paths run."""
    root = tmp_path_factory.mktemp("lowrank_cli")
    base, noisy = make_llama_pair(root, seed=5, tied=True)
    ft = root / "lowrank-ft"
    shutil.copytree(noisy, ft)
    tensors = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(2)
    for name, t in tensors.items():
        if t.dim() == 2 and "layers" in name:
            u, v = torch.randn(t.shape[0], 4, generator=gen), torch.randn(4, t.shape[1], generator=gen)
            tensors[name] = t + 0.05 * t.std() * u @ v / 2
    save_file(tensors, str(ft / "model.safetensors"), metadata={"format": "pt"})
    save_byte_tokenizer(ft)
    (root / "cal.txt").write_text(open(os.__file__, encoding="utf-8").read())
    return root, base, ft


def _compress(pair, out, *flags):
    root, base, ft = pair
    return deltactl("compress", base, ft, "-o", out, "--base-name", "org/tiny", *flags, "--json")


def test_lowrank_mp_compress_inspect_apply(pair, tmp_path):
    root, base, ft = pair
    out = tmp_path / "lr.bdelta"
    res = _compress(pair, out, "--codec", "lowrank-mp", "--ratio", "16", "--group-size", "32")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["binarized"] == 14
    delta = DeltaFile.open(out)
    assert delta.codec == "lowrank-mp"
    assert json.loads(delta.metadata["lowrank"])["group_size"] == 32
    shapes = {n: Checkpoint.open(base).entry(n).shape for n in delta.entries}
    for name, e in delta.entries.items():
        if e.kind == "lowrank-mp":
            assert delta.tensor_info(name).layout.bands[0].group_size == 32
            assert 8 * e.nbytes <= budget_bits(*shapes[name], 16)
    info = json.loads(deltactl("inspect", out, "--json").stdout)
    rows = [t for t in info["tensors"] if t["kind"] == "lowrank-mp"]
    assert rows and all(t["form"] == "low rank" and t["rank"] >= 1 and "b×" in t["bands"] for t in rows)
    text = deltactl("inspect", out).stdout
    assert "lowrank-mp" in text
    res = deltactl("apply", base, out, "-o", tmp_path / "model")
    assert res.exit_code == 0, res.output
    applied = Checkpoint.open(tmp_path / "model")
    name = rows[0]["name"]
    codec = codecs.get("lowrank-mp")
    want = torch.cat(
        list(codec.reconstruct_blocks(delta, name, Checkpoint.open(base).get(name), torch.float32))
    )
    assert torch.equal(applied.get(name), want)


@pytest.mark.parametrize(("flags", "rank"), [(("--rank", "3"), 3), (("--ratio", "8", "--bits", "1"), None)])
def test_hybrid_compress_inspect_apply(pair, tmp_path, flags, rank):
    root, base, ft = pair
    out = tmp_path / "h.bdelta"
    res = _compress(pair, out, "--codec", "hybrid", *flags)
    assert res.exit_code == 0, res.output
    delta = DeltaFile.open(out)
    assert delta.codec == "hybrid"
    meta = json.loads(delta.metadata["hybrid"])
    assert meta["rank"] == rank and meta["planes"] == 1
    info = json.loads(deltactl("inspect", out, "--json").stdout)
    rows = [t for t in info["tensors"] if t["kind"] == "hybrid"]
    assert rows and all(t["planes"] == 1 for t in rows)
    if rank is not None:
        assert {t["rank"] for t in rows} == {3}
    assert deltactl("apply", base, out, "-o", tmp_path / "model").exit_code == 0


def test_lowrank_mp_calibrate_weights_the_search(pair, tmp_path):
    root, _, _ = pair
    out = tmp_path / "cal.bdelta"
    res = _compress(
        pair,
        out,
        "--codec",
        "lowrank-mp",
        "--ratio",
        "16",
        "--calibrate",
        root / "cal.txt",
        "--samples",
        "4",
        "--seq-len",
        "32",
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["calibration"] is None  # moments steer the search, nothing is distilled
    search = json.loads(DeltaFile.open(out).metadata["lowrank"])["search"]
    assert search["error"] == "output, weighted by calibration E[x^2]" and search["tokens"] == 4 * 32


def test_hybrid_calibrate_distils_the_residuals_scales(pair, tmp_path):
    root, base, ft = pair
    out = tmp_path / "hcal.bdelta"
    res = _compress(
        pair,
        out,
        "--codec",
        "hybrid",
        "--rank",
        "2",
        "--calibrate",
        root / "cal.txt",
        "--steps",
        "4",
        "--batch",
        "2",
        "--seq-len",
        "32",
        "--samples",
        "8",
    )
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["calibration"]["final_loss"] < result["calibration"]["initial_loss"]
    # Only the scales changed: the factors and signs are the undistilled encoding's.
    plain = tmp_path / "plain.bdelta"
    assert _compress(pair, plain, "--codec", "hybrid", "--rank", "2").exit_code == 0
    a, b = DeltaFile.open(plain), DeltaFile.open(out)
    assert list(a.header.tensors) == list(b.header.tensors)
    changed = [k for k in a.header.tensors if not torch.equal(a.tensor(k), b.tensor(k))]
    assert changed and all(k.endswith(".scale") for k in changed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hcal.bdelta", "plain.bdelta"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--codec", "lowrank-mp"), "lowrank-mp needs --ratio"),
        (("--codec", "lowrank-mp", "--ratio", "1"), "ratio must be between 2 and 16384, got 1.0"),
        (("--codec", "hybrid"), "hybrid needs exactly one of --rank and --ratio"),
        (
            ("--codec", "hybrid", "--rank", "4", "--ratio", "8"),
            "hybrid needs exactly one of --rank and --ratio",
        ),
        (("--codec", "hybrid", "--ratio", "16"), "hybrid --ratio must be above 1 and below 16"),
        (("--codec", "hybrid", "--rank", "0"), "Invalid value for '--rank'"),
    ],
)
def test_bad_flags_fail_and_write_nothing(pair, tmp_path, flags, message):
    out = tmp_path / "bad.bdelta"
    res = _compress(pair, out, *flags)
    assert res.exit_code != 0 and message in res.output, res.output
    assert not out.exists()
