"""Smoke test of the real-pair evaluation pipeline (eval/) on a tiny model: the same corpus
split, fine-tune, caching, compression and fidelity bookkeeping as `python -m eval.fidelity`,
with a few steps on short sequences instead of SmolLM2 (which takes minutes to build)."""

from __future__ import annotations

import json

import pytest
import torch

from codec.apply import apply_delta
from codec.checkpoint import Checkpoint
from codec.compress import CompressOptions, compress
from codec.format import DeltaFile
from eval import corpus, fidelity, pair
from tests.support.model_pairs import make_llama_pair, save_byte_tokenizer

RECIPE = pair.Recipe(steps=3, batch=2, seq_len=32, lr=3e-3, warmup=1, dtype="float32")


def test_corpus_split_is_deterministic_disjoint_and_mostly_train():
    files = corpus.stdlib_files()
    assert len(files) > 200
    assert not any(part in corpus.SKIP_PARTS for f in files for part in f.parts[-3:-1])
    splits = [corpus.split_of(f) for f in files]
    assert splits == [corpus.split_of(f) for f in files]
    held = splits.count("heldout") / len(splits)
    assert 0.02 < held < 0.10  # about HELDOUT_PERCENT
    train, heldout = corpus.texts("train"), corpus.texts("heldout")
    assert len(train) + len(heldout) <= len(files) and len(heldout) < len(train) / 10
    # The split is by path, so byte-identical files may land on both sides; in the stdlib
    # those are only trivial ones (empty __init__.py, a hello-world), never real sources.
    assert all(len(t) < 200 for t in set(train) & set(heldout))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalpair")
    base, _ = make_llama_pair(root, seed=5, hidden=64, layers=2)
    save_byte_tokenizer(base)
    ft = pair.finetune(base, root / "tuned", RECIPE, log=lambda _: None)
    return root, base, ft


def test_finetune_learns_and_is_cached_by_recipe(tiny):
    root, base, ft = tiny
    marker = json.loads((ft / "deltastore-recipe.json").read_text())
    assert marker["recipe"]["steps"] == RECIPE.steps and len(marker["losses"]) == RECIPE.steps
    assert pair.heldout_loss(ft, seq_len=32, blocks=8) < pair.heldout_loss(base, seq_len=32, blocks=8)
    weights = ft / "model.safetensors"
    before = weights.stat().st_mtime_ns
    logged = []
    assert pair.finetune(base, ft, RECIPE, log=logged.append) == ft
    assert weights.stat().st_mtime_ns == before and logged == []  # same recipe: nothing retrained
    assert not list(root.glob(".*incomplete*"))


def test_model_with_delta_matches_apply_and_fidelity_metadata_round_trips(tiny, tmp_path):
    root, base, ft = tiny
    delta = tmp_path / "d.bdelta"
    compress(base, ft, delta, CompressOptions())
    applied = tmp_path / "applied"
    apply_delta(base, delta, applied)
    ids = torch.arange(40).reshape(2, 20)
    with torch.no_grad():
        ours = fidelity.model_with_delta(base, delta)(ids).logits
        theirs = fidelity._load(applied)(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

    before = DeltaFile.open(delta)
    tensors = {k: before.tensor(k).clone() for k in before.header.tensors}
    summary = {"loss": 1.5, "gain_recovered": 0.9, "greedy_agreement": 0.5}
    fidelity.write_fidelity(delta, summary)
    after = DeltaFile.open(delta)
    assert json.loads(after.metadata["fidelity"]) == summary
    assert {k: v for k, v in after.metadata.items() if k != "fidelity"} == before.metadata
    assert set(after.header.tensors) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(after.tensor(k), v), k
    assert fidelity.linear_ratio(delta, Checkpoint.open(ft)) > 10  # fp32 weights vs 1 bit


def test_lowrank_baseline_stays_within_the_one_bit_budget(tiny, tmp_path):
    root, base, ft = tiny
    delta = tmp_path / "d.bdelta"
    compress(base, ft, delta, CompressOptions())
    entries = DeltaFile.open(delta).entries
    names = [n for n, e in entries.items() if e.kind != "full"]
    model, total = fidelity.model_with_lowrank(base, ft, names)
    ckpt_ft, ckpt_base = Checkpoint.open(ft), Checkpoint.open(base)
    dense = sum(
        ckpt_ft.entry(n).nbytes
        for n in ckpt_ft.names
        if n not in names and not torch.equal(ckpt_ft.get(n), ckpt_base.get(n))
    )
    one_bit = sum(ckpt_ft.get(n).shape[0] * ((ckpt_ft.get(n).shape[1] + 7) // 8) + 4 for n in names)
    assert 0 < total - dense <= one_bit
    # The low-rank model is closer to the fine-tune than the base is, matrix by matrix.
    state = model.state_dict()
    for n in names:
        ft_w, base_w = ckpt_ft.get(n).float(), ckpt_base.get(n).float()
        assert (state[n] - ft_w).norm() < (base_w - ft_w).norm(), n


def test_the_whole_fidelity_table_on_the_tiny_pair(tiny, tmp_path):
    from codec.distill import DistillOptions

    root, base, ft = tiny
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n\n".join(corpus.texts("train")[:40]))
    settings = fidelity.Settings(
        distill=DistillOptions(steps=3, batch=2, seq_len=16, samples=8, lr=1e-3),
        heldout_blocks=4,
        seq_len=32,
        prompts=2,
        prompt_len=8,
        new_tokens=4,
        ratios=(16,),
    )
    work = tmp_path / "variants"
    report = fidelity.evaluate(base, ft, work, calibration, settings)

    labels = [r.variant for r in report.rows]
    assert labels == ["base", "fine-tuned (fp16)"] + [v[0] for v in fidelity.variants_for(settings)] + [
        "SVD low-rank delta, same bytes as 1-bit"
    ]
    base_row, ft_row = report.rows[:2]
    assert ft_row.kl == pytest.approx(0, abs=1e-6) and ft_row.top1 == 1 and ft_row.agreement == 1
    assert base_row.kl > 0 and base_row.loss > ft_row.loss
    for r in report.rows[2:]:
        assert r.kl >= 0 and 0 <= r.top1 <= 1 and 0 <= r.agreement <= 1 and r.bytes > 0
    table = report.markdown()
    assert all(f"| {label} |" in table for label in labels)
    # Each variant's file carries its own row's figures.
    files = {p.name: p for p in work.glob("*.bdelta")}
    assert "1-bit-per-matrix-distilled.distilled-3.bdelta" in files and "DeltaDQ16xauto.bdelta" in files
    stored = json.loads(DeltaFile.open(files["DeltaDQ16xauto.bdelta"]).metadata["fidelity"])
    dq_row = next(r for r in report.rows if r.variant == "DeltaDQ 16x (auto)")
    assert (stored["loss"], stored["kl_to_finetuned"], stored["top1_agreement"]) == (
        dq_row.loss,
        dq_row.kl,
        dq_row.top1,
    )
    assert stored["loss_base"] == base_row.loss and stored["loss_finetuned"] == ft_row.loss
    searched = json.loads(DeltaFile.open(files["DeltaDQ16xcalibratedsearch.bdelta"]).metadata["deltadq"])[
        "search"
    ]
    assert (
        searched["tokens"] > 0
        and stored.keys()
        <= json.loads(DeltaFile.open(files["DeltaDQ16xcalibratedsearch.bdelta"]).metadata["fidelity"]).keys()
    )
    # Distillation ran; its figures are cached beside the file and agree with its metadata.
    assert set(report.distill_figures) == {"1-bit, per-matrix, distilled", "2 planes, per-matrix, distilled"}
    calibrated = json.loads(
        DeltaFile.open(files["1-bit-per-matrix-distilled.distilled-3.bdelta"]).metadata["calibration"]
    )
    figures = report.distill_figures["1-bit, per-matrix, distilled"]
    assert (figures["initial_loss"], figures["final_loss"]) == (
        calibrated["initial_loss"],
        calibrated["final_loss"],
    )
    assert calibrated["steps"] == 3 and figures["seconds"] > 0 and figures["peak_rss_bytes"] > 0
    cached = {p: p.read_text() for p in work.glob("*.json")}
    again = fidelity.evaluate(base, ft, work, calibration, settings)
    assert {p: p.read_text() for p in work.glob("*.json")} == cached  # nothing distilled twice
    assert [(r.variant, r.loss) for r in again.rows] == [(r.variant, r.loss) for r in report.rows]
