"""Calibration-steered DeltaDQ search: layer-input moments, the weighted choice, and
`deltactl compress --codec deltadq --calibrate`."""

from __future__ import annotations

import json
import os

import pytest
import torch

from codec import deltadq
from codec.activations import InputMoments, input_moments
from codec.compress import CompressOptions, DeltaDQOptions, compress
from codec.errors import CalibrationDataError, CodecError
from codec.format import DeltaFile
from tests.support.model_pairs import make_llama_pair, save_byte_tokenizer


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("moments")
    base, ft = make_llama_pair(root, seed=6, hidden=128, layers=1)
    save_byte_tokenizer(ft)
    (root / "cal.txt").write_text(open(os.__file__, encoding="utf-8").read())
    return root, base, ft


def test_moments_are_the_mean_square_of_each_linear_input(pair):
    from transformers import AutoModelForCausalLM

    root, base, ft = pair
    m = input_moments(ft, root / "cal.txt", samples=6, seq_len=32, batch=4, seed=1)
    model = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32)
    linears = {f"{n}.weight": mod for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert set(m.moments) == set(linears) and m.tokens == 6 * 32
    for name, mod in linears.items():
        assert m.moments[name].shape == (mod.in_features,) and bool((m.moments[name] >= 0).all())
    # lm_head's input is the final hidden state: check that one against an independent pass.
    from codec.activations import token_samples, tokenizer_for

    tokens = token_samples(tokenizer_for(ft), [open(root / "cal.txt").read()], 32, 6, 1)
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(
        m.moments["lm_head.weight"], hidden.pow(2).reshape(-1, hidden.shape[-1]).mean(0), rtol=1e-5, atol=1e-7
    )
    with pytest.raises(CodecError, match="calibration moments have shape"):
        m.weight_for("lm_head.weight", 7)
    with pytest.raises(CalibrationDataError, match="no such file"):
        input_moments(ft, root / "missing.txt")


def test_weighted_choice_minimises_the_weighted_error():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 512, generator=g)
    delta = torch.randn(64, 512, generator=g) * 0.01
    delta[:, :256] *= torch.linspace(0.1, 4, 256)  # structure the search can exploit
    ft = base + delta
    w = torch.zeros(512)
    w[:256] = torch.rand(256, generator=g) * 10  # only the first half of the inputs ever fire
    kwargs = dict(ratio=32, bits=None, keep_ratio=None, group_size=None, parts=1)
    plain = deltadq.choose(ft, base, "t", 5, **kwargs)
    weighted = deltadq.choose(ft, base, "t", 5, channel_weight=w, **kwargs)

    def weighted_err(p):
        d = deltadq.decode(*deltadq.encode(ft, base, "t", 5, p), "t", 5, p, 512)
        return float(((d - delta).pow(2) * w).sum())

    assert weighted != plain and weighted_err(weighted) < weighted_err(plain)
    assert weighted.bits_per_weight(64, 512) <= 16 / 32


def test_compress_records_the_calibrated_search_and_cli_runs_it(pair, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    root, base, ft = pair
    m = input_moments(ft, root / "cal.txt", samples=4, seq_len=32)
    path = tmp_path / "d.bdelta"
    compress(base, ft, path, CompressOptions(codec=DeltaDQOptions(ratio=16)), input_moments=m)
    search = json.loads(DeltaFile.open(path).metadata["deltadq"])["search"]
    assert search["tokens"] == 128 and search["data_fingerprint"] == m.data_fingerprint
    plain = tmp_path / "p.bdelta"
    compress(base, ft, plain, CompressOptions(codec=DeltaDQOptions(ratio=16)))
    assert json.loads(DeltaFile.open(plain).metadata["deltadq"])["search"] == {
        "error": "weights (isotropic inputs)"
    }

    out = tmp_path / "cli.bdelta"
    res = CliRunner().invoke(
        app,
        [
            "compress",
            str(base),
            str(ft),
            "-o",
            str(out),
            "--base-name",
            "org/tiny",
            "--codec",
            "deltadq",
            "--ratio",
            "16",
            "--calibrate",
            str(root / "cal.txt"),
            "--samples",
            "4",
            "--seq-len",
            "32",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(DeltaFile.open(out).metadata["deltadq"])["search"]["tokens"] == 128
    assert not list(tmp_path.glob("*.init"))
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01binary")
    res = CliRunner().invoke(
        app,
        [
            "compress",
            str(base),
            str(ft),
            "-o",
            str(tmp_path / "x.bdelta"),
            "--base-name",
            "org/tiny",
            "--codec",
            "deltadq",
            "--ratio",
            "16",
            "--calibrate",
            str(tmp_path / "bin.txt"),
        ],
    )
    assert res.exit_code == 7 and "NUL bytes" in res.output and not (tmp_path / "x.bdelta").exists()


def test_moments_object_is_plain_data():
    m = InputMoments({"a.weight": torch.ones(3)}, 10, "sha256:x")
    assert m.weight_for("b.weight", 3) is None and m.weight_for("a.weight", 3).tolist() == [1, 1, 1]
