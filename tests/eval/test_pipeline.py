"""Smoke test of the real-pair evaluation pipeline (eval/) on a tiny model: the same corpus
split, fine-tune, caching, compression and fidelity bookkeeping as `python -m eval.fidelity`,
with a few steps on short sequences instead of SmolLM2 (which takes minutes to build)."""

from __future__ import annotations

import json
from dataclasses import astuple, replace

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
    base, _ = make_llama_pair(root, seed=5, hidden=128, layers=2)
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


def test_heldout_windows_are_as_many_as_asked_deterministic_and_never_training_text(tiny):
    from transformers import AutoTokenizer

    root, base, ft = tiny
    tok = AutoTokenizer.from_pretrained(base)
    windows = corpus.heldout_windows(tok, 40, 256)
    assert len(windows) == 40 and {len(w) for w in windows} == {256}
    assert windows == corpus.heldout_windows(tok, 40, 256)
    assert len({tuple(w) for w in windows}) == 40
    train = corpus.texts("train")
    heldout = "\n".join(corpus.texts("heldout"))
    pieces = [p for w in windows for p in tok.decode(w).split(tok.eos_token) if len(p) >= 200]
    assert len(pieces) >= 30
    for piece in pieces:  # real held-out text, found in no training file
        assert piece in heldout and not any(piece in t for t in train)
    every = corpus.token_blocks(tok, corpus.texts("heldout"), 256)
    assert windows[0] == every[0] and windows[-1] == every[39 * len(every) // 40]  # spread evenly
    with pytest.raises(ValueError, match=f"has {len(every)} windows of 256 tokens, fewer than the"):
        corpus.heldout_windows(tok, len(every) + 1, 256)


def test_scores_are_zero_kl_and_full_agreement_for_the_fine_tune_and_match_the_model_loss(tiny):
    root, base, ft = tiny
    windows = torch.tensor(corpus.heldout_windows(_tokenizer(base), 12, 32))
    ft_model, base_model = fidelity._load(ft), fidelity._load(base)
    reference = fidelity.Reference(
        fidelity.last_hidden(ft_model, windows, 5), ft_model.get_output_embeddings().weight.detach(), None
    )
    same = fidelity.score(ft_model, windows, reference, 5)
    assert same.kl == 0 and same.top1 == 1
    other = fidelity.score(base_model, windows, reference, 5)
    assert other.kl > 0 and other.top1 < 1 and other.loss > same.loss
    with torch.no_grad():
        hf = [m(windows, labels=windows).loss.item() for m in (ft_model, base_model)]
    assert (same.loss, other.loss) == pytest.approx(hf, rel=1e-5)
    assert astuple(fidelity.score(base_model, windows, reference, 12)) == pytest.approx(
        astuple(other), rel=1e-5
    )


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


TINY_VARIANTS = (
    fidelity.Variant("1-bit", "bitdelta", 16),
    fidelity.Variant("1-bit, distilled (scales >= 0)", "bitdelta", 16, calibration="distill"),
    fidelity.Variant("1-bit, distilled (signed)", "bitdelta", 16, calibration="distill-signed"),
    fidelity.Variant("1-bit, per-row", "bitdelta", 16, (("scale_mode", "per-row"),)),
    fidelity.Variant("DeltaDQ 16x, steered", "deltadq", 16, calibration="activations"),
    fidelity.Variant("SVD 16x", "svd", 16),
    fidelity.Variant("DeltaDQ 32x", "deltadq", 32),
    fidelity.Variant("SVD 32x", "svd", 32),
    fidelity.Variant("lowrank-mp 16x, steered", "lowrank-mp", 16, calibration="activations"),
    fidelity.Variant("hybrid 8x", "hybrid", 8),
)


def test_the_whole_fidelity_table_on_the_tiny_pair(tiny, tmp_path):
    from codec.distill import DistillOptions

    root, base, ft = tiny
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n\n".join(corpus.texts("train")[:40]))
    settings = fidelity.Settings(
        variants=TINY_VARIANTS,
        distill=DistillOptions(steps=3, batch=2, seq_len=16, samples=8, lr=1e-3),
        windows=10,
        seq_len=32,
        batch=4,
        threads=None,
        prompts=2,
        prompt_len=8,
        new_tokens=4,
    )
    work = tmp_path / "variants"
    report = fidelity.evaluate(base, ft, work, calibration, settings)

    labels = [r.variant for r in report.rows]
    assert labels == ["base", "fine-tuned (fp16)"] + [v.label for v in TINY_VARIANTS] and not report.missing
    assert report.windows == 10
    rows = {r.variant: r for r in report.rows}
    base_row, ft_row = report.rows[:2]
    assert ft_row.kl == 0 and ft_row.top1 == 1 and ft_row.agreement == 1
    assert base_row.kl > 0 and base_row.loss > ft_row.loss
    for r in report.rows[2:]:
        assert r.kl > 0 and 0 < r.top1 <= 1 and 0 <= r.agreement <= 1 and r.bytes > 0 and r.seconds > 0
    # Each variant's real ratio on the compressed tensors, against its row group's: SVD never
    # spends more than the group's bytes, DeltaDQ keeps its promise, 1-bit is 16x less its scales.
    assert 15 < rows["1-bit"].linear_ratio <= 16
    assert rows["SVD 16x"].linear_ratio >= 16 and rows["SVD 32x"].linear_ratio >= 32
    assert rows["DeltaDQ 16x, steered"].linear_ratio >= 15.9 and rows["DeltaDQ 32x"].linear_ratio >= 31.8
    assert rows["1-bit, per-row"].linear_ratio < rows["1-bit"].linear_ratio  # row scales cost bytes
    # lowrank-mp keeps --ratio per tensor (a tensor it stores as 1-bit signs is 16x less its scale)
    assert rows["lowrank-mp 16x, steered"].linear_ratio >= 15.9 and rows["hybrid 8x"].linear_ratio >= 7.9
    assert rows["1-bit, distilled (scales >= 0)"].notes.startswith("0 of 14 scales negative")
    table = report.markdown()
    assert all(f"| {label} |" in table for label in labels)
    assert "| 16x | SVD 16x |" in table and "| 32x | DeltaDQ 32x |" in table

    # Each variant's file carries its own row's figures.
    files = {p.name: p for p in work.glob("*.bdelta")}
    stored = json.loads(DeltaFile.open(files["deltadq-32x.bdelta"]).metadata["fidelity"])
    dq = rows["DeltaDQ 32x"]
    assert (stored["loss"], stored["kl_to_finetuned"], stored["top1_agreement"]) == (dq.loss, dq.kl, dq.top1)
    assert stored["loss_base"] == base_row.loss and stored["loss_finetuned"] == ft_row.loss
    steered = json.loads(DeltaFile.open(files["deltadq-16x-activations.bdelta"]).metadata["deltadq"])
    assert steered["search"]["tokens"] > 0
    # Distillation ran from the shared 1-bit file; its figures are cached beside each result.
    assert set(report.distill_figures) == {"1-bit, distilled (scales >= 0)", "1-bit, distilled (signed)"}
    for name, nonnegative in (("bitdelta-16x.distilled-3", True), ("bitdelta-16x.distilled-3-signed", False)):
        calibrated = json.loads(DeltaFile.open(files[name + ".bdelta"]).metadata["calibration"])
        assert calibrated["nonnegative"] is nonnegative and calibrated["steps"] == 3
    figures = report.distill_figures["1-bit, distilled (signed)"]
    assert figures["seconds"] > 0 and figures["peak_rss_bytes"] > 0

    # A second run scores nothing again: same rows, no file rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in work.iterdir()}
    again = fidelity.evaluate(base, ft, work, calibration, settings)
    assert [(r.variant, r.loss, r.kl) for r in again.rows] == [(r.variant, r.loss, r.kl) for r in report.rows]
    assert {p: p.stat().st_mtime_ns for p in work.iterdir()} == stamps
    # A new variant is reported missing by a cached-only run, scored by a full one.
    extra = fidelity.Variant("2 planes", "bitdelta", 8)
    more = fidelity.Settings(**{**settings.__dict__, "variants": TINY_VARIANTS + (extra,)})
    cached = fidelity.evaluate(base, ft, work, calibration, replace(more, cached_only=True))
    assert cached.missing == ["2 planes"] and "not scored yet: 2 planes" in cached.markdown()
    full = fidelity.evaluate(base, ft, work, calibration, more)
    assert full.rows[-1].variant == "2 planes" and 7.5 < full.rows[-1].linear_ratio <= 8.2
    assert full.rows[-1].kl < rows["1-bit"].kl


def test_unknown_codec_or_ratio_is_a_clear_error(tiny, tmp_path):
    root, base, ft = tiny
    (tmp_path / "cal.txt").write_text("\n\n".join(corpus.texts("train")[:5]))
    for variant, message in (
        (
            fidelity.Variant("x", "nocodec", 16),
            r"x: unknown codec 'nocodec' \(known: bitdelta, deltadq, lowrank-mp, hybrid\)",
        ),
        (fidelity.Variant("y", "bitdelta", 32), "there is no 32x"),
    ):
        settings = fidelity.Settings(
            variants=(variant,), windows=2, seq_len=16, prompts=1, prompt_len=4, new_tokens=2, threads=None
        )
        with pytest.raises(ValueError, match=message):
            fidelity.evaluate(base, ft, tmp_path / "v", tmp_path / "cal.txt", settings)


def test_a_row_scored_in_slices_by_separate_runs_equals_the_row_scored_at_once(tiny, tmp_path):
    root, base, ft = tiny
    (tmp_path / "cal.txt").write_text("\n\n".join(corpus.texts("train")[:5]))
    one_bit = fidelity.Variant("1-bit", "bitdelta", 16)
    settings = fidelity.Settings(
        variants=(one_bit,), windows=6, seq_len=32, prompts=2, prompt_len=8, new_tokens=4, threads=None
    )
    whole = fidelity.evaluate(base, ft, tmp_path / "a", tmp_path / "cal.txt", settings)
    first = fidelity.evaluate(base, ft, tmp_path / "b", tmp_path / "cal.txt", replace(settings, shard=(0, 2)))
    assert [r.variant for r in first.rows] == [] and first.missing == ["base", "fine-tuned (fp16)", "1-bit"]
    second = fidelity.evaluate(
        base, ft, tmp_path / "b", tmp_path / "cal.txt", replace(settings, shard=(1, 2))
    )
    assert not second.missing
    for a, b in zip(whole.rows, second.rows, strict=True):
        assert (a.variant, a.agreement, a.bytes) == (b.variant, b.agreement, b.bytes)
        assert (b.loss, b.kl, b.top1) == pytest.approx((a.loss, a.kl, a.top1), rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="shard must be i/n with 0 <= i < n, got 2/2"):
        fidelity.evaluate(base, ft, tmp_path / "b", tmp_path / "cal.txt", replace(settings, shard=(2, 2)))
