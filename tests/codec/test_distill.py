"""Scale distillation: lowers the calibration loss, changes only the scales, round-trips."""

from __future__ import annotations

import json
import os

import pytest
import torch

from codec.compress import BitDeltaOptions, CompressOptions, compress
from codec.distill import DistillOptions, distill_scales
from codec.errors import CalibrationDataError, CodecError
from codec.format import DeltaFile
from tests.support.model_pairs import make_llama_pair, save_byte_tokenizer

FAST = DistillOptions(steps=12, batch=2, seq_len=48, samples=24, lr=1e-4)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    base, ft = make_llama_pair(root, seed=3, tied=True, delta_std=0.2)
    save_byte_tokenizer(ft)
    (root / "cal.txt").write_text(open(os.__file__, encoding="utf-8").read())
    return root, base, ft


@pytest.mark.parametrize(("planes", "scale", "loss"), [(1, "per-matrix", "mse"), (2, "per-row", "kl")])
def test_distillation_lowers_loss_and_changes_only_scales(pair, tmp_path, planes, scale, loss):
    root, base, ft = pair
    init = tmp_path / "init.bdelta"
    compress(base, ft, init, CompressOptions(codec=BitDeltaOptions(planes=planes, scale_mode=scale)))
    out = tmp_path / "distilled.bdelta"
    options = DistillOptions(**{**FAST.__dict__, "loss": loss})
    report = distill_scales(base, ft, init, out, root / "cal.txt", options)
    assert report.final_loss < report.initial_loss

    before, after = DeltaFile.open(init), DeltaFile.open(out)
    assert list(before.header.tensors) == list(after.header.tensors)
    changed = 0
    for key in before.header.tensors:
        a, b = before.tensor(key), after.tensor(key)
        if key.endswith(".scale"):
            assert a.shape == b.shape and b.dtype == torch.float32 and torch.isfinite(b).all()
            changed += int(not torch.equal(a, b))
        else:
            assert torch.equal(a, b), key  # signs and dense tensors bit-identical
    assert changed > 0
    meta = after.metadata
    calibration = json.loads(meta["calibration"])
    assert calibration["steps"] == FAST.steps and calibration["loss"] == loss
    assert calibration["final_loss"] == pytest.approx(report.final_loss)
    assert calibration["data_fingerprint"].startswith("sha256:")
    assert {k: v for k, v in meta.items() if k != "calibration"} == before.metadata


def test_reproducible_with_seed(pair, tmp_path):
    root, base, ft = pair
    compress(base, ft, tmp_path / "init.bdelta")
    distill_scales(base, ft, tmp_path / "init.bdelta", tmp_path / "a.bdelta", root / "cal.txt", FAST)
    distill_scales(base, ft, tmp_path / "init.bdelta", tmp_path / "b.bdelta", root / "cal.txt", FAST)
    a, b = DeltaFile.open(tmp_path / "a.bdelta"), DeltaFile.open(tmp_path / "b.bdelta")
    for key in a.header.tensors:
        assert torch.equal(a.tensor(key), b.tensor(key))


def test_offloaded_teacher_gives_the_same_scales_within_fp16_rounding(pair, tmp_path):
    root, base, ft = pair
    compress(base, ft, tmp_path / "init.bdelta")
    distill_scales(base, ft, tmp_path / "init.bdelta", tmp_path / "a.bdelta", root / "cal.txt", FAST)
    off = DistillOptions(**{**FAST.__dict__, "offload_teacher": True})
    report = distill_scales(base, ft, tmp_path / "init.bdelta", tmp_path / "b.bdelta", root / "cal.txt", off)
    assert report.final_loss < report.initial_loss
    a, b = DeltaFile.open(tmp_path / "a.bdelta"), DeltaFile.open(tmp_path / "b.bdelta")
    for name, e in a.entries.items():
        if e.scale is not None:
            torch.testing.assert_close(a.scale(name), b.scale(name), rtol=0.05, atol=1e-5)


def test_jsonl_and_directory_sources(pair, tmp_path):
    root, base, ft = pair
    compress(base, ft, tmp_path / "init.bdelta")
    text = (root / "cal.txt").read_text()
    lines = [json.dumps({"text": text[i : i + 500]}) for i in range(0, 20000, 500)]
    (tmp_path / "cal.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(text[:10000])
    (tmp_path / "docs" / "b.md").write_text(text[10000:20000])
    for source in (tmp_path / "cal.jsonl", tmp_path / "docs"):
        report = distill_scales(base, ft, tmp_path / "init.bdelta", tmp_path / "o.bdelta", source, FAST)
        assert report.final_loss < report.initial_loss


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "is empty"),
        ("blank.txt", b"   \n\n", "is empty"),
        ("model.bin", b"\x00\x01\x02binary", "NUL bytes"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "not UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\nnot json\n', "bad.jsonl:2: not a JSON object"),
        ("notext.jsonl", b'{"body": "x"}\n', "string 'text' field"),
        ("tiny.txt", b"ab", "fewer than one 48-token sample"),
    ],
)
def test_bad_calibration_data(pair, tmp_path, name, content, message):
    root, base, ft = pair
    compress(base, ft, tmp_path / "init.bdelta")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CalibrationDataError, match=message):
        distill_scales(base, ft, tmp_path / "init.bdelta", tmp_path / "o.bdelta", tmp_path / name, FAST)
    assert not (tmp_path / "o.bdelta").exists()


def test_missing_calibration_file_and_bad_options(pair, tmp_path):
    root, base, ft = pair
    compress(base, ft, tmp_path / "init.bdelta")
    with pytest.raises(CalibrationDataError, match="no such file"):
        distill_scales(
            base, ft, tmp_path / "init.bdelta", tmp_path / "o.bdelta", tmp_path / "missing.txt", FAST
        )
    with pytest.raises(CodecError, match="steps must be >= 1"):
        DistillOptions(steps=0)
    with pytest.raises(CodecError, match="loss must be"):
        DistillOptions(loss="l1")  # type: ignore[arg-type]


def test_cli_compress_with_calibration(pair, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    root, base, ft = pair
    out = tmp_path / "d.bdelta"
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
            "--calibrate",
            str(root / "cal.txt"),
            "--steps",
            "6",
            "--batch",
            "2",
            "--seq-len",
            "32",
            "--samples",
            "12",
            "--lr",
            "1e-4",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["calibration"]["final_loss"] < result["calibration"]["initial_loss"]
    assert json.loads(DeltaFile.open(out).metadata["calibration"])["steps"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bdelta"]  # the undistilled temp is gone

    res = CliRunner().invoke(
        app,
        [
            "compress",
            str(base),
            str(ft),
            "-o",
            str(tmp_path / "e.bdelta"),
            "--base-name",
            "org/tiny",
            "--calibrate",
            str(tmp_path / "nope.txt"),
        ],
    )
    assert res.exit_code == 7 and "bad calibration data" in res.output
    assert not (tmp_path / "e.bdelta").exists() and not (tmp_path / "e.bdelta.init").exists()


@pytest.fixture(scope="module")
def small_delta_pair(tmp_path_factory):
    """A pair whose second layer barely changed (its matrices' deltas 0.3 % of the first's), as
    in a real fine-tune's late `o_proj`s: scales so small that one optimizer step crosses zero."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("smalldelta")
    base, ft = make_llama_pair(root, seed=3, tied=True, delta_std=0.2)
    save_byte_tokenizer(ft)
    b, f = load_file(base / "model.safetensors"), load_file(ft / "model.safetensors")
    for k in f:
        if k.startswith("model.layers.1.") and f[k].dim() == 2:
            f[k] = b[k] + (f[k] - b[k]) * 0.003
    save_file(f, ft / "model.safetensors", metadata={"format": "pt"})
    (root / "cal.txt").write_text(open(os.__file__, encoding="utf-8").read())
    compress(base, ft, root / "init.bdelta")
    return root, base, ft


def _scales(path) -> torch.Tensor:
    delta = DeltaFile.open(path)
    return torch.cat([delta.scale(n).flatten() for n, e in delta.entries.items() if e.scale is not None])


def test_scales_never_cross_zero_and_the_loss_stays_as_good(small_delta_pair, tmp_path):
    root, base, ft = small_delta_pair
    signed_options = DistillOptions(**{**FAST.__dict__, "nonnegative": False})
    init, cal = root / "init.bdelta", root / "cal.txt"
    signed = distill_scales(base, ft, init, tmp_path / "s.bdelta", cal, signed_options)
    kept = distill_scales(base, ft, init, tmp_path / "k.bdelta", cal, FAST)
    assert FAST.nonnegative  # the default
    assert (_scales(tmp_path / "s.bdelta") < 0).any()  # unconstrained, the optimizer flips some deltas
    scales = _scales(tmp_path / "k.bdelta")
    assert (scales >= 0).all() and (_scales(root / "init.bdelta") > 0).all()
    calibration = json.loads(DeltaFile.open(tmp_path / "k.bdelta").metadata["calibration"])
    assert calibration["nonnegative"] is True
    assert calibration["scales_at_zero"] == kept.clamped == int((scales == 0).sum())
    # The constraint costs the calibration loss at most 2 % of the unconstrained run's.
    assert kept.final_loss < kept.initial_loss == signed.initial_loss
    assert kept.final_loss <= 1.02 * signed.final_loss
