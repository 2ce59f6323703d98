"""compress -> apply round trips on real (tiny) HF Llama checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from codec.apply import apply_delta
from codec.bitdelta import reconstruct
from codec.checkpoint import Checkpoint, fingerprint_tensors
from codec.compress import BitDeltaOptions, CompressOptions, compress
from codec.errors import BaseMismatchError, CodecError, IncompatibleDeltaError
from codec.format import DeltaFile
from codec.summary import summarize


def _state(dir_):
    ckpt = Checkpoint.open(dir_)
    return {n: ckpt.get(n) for n in ckpt.names}


@pytest.mark.parametrize("planes,scale", [(1, "per-matrix"), (2, "per-row")])
def test_round_trip_reproduces_base_plus_sign_scale(llama_pair, tmp_path, planes, scale):
    base_dir, ft_dir = llama_pair
    report = compress(
        base_dir,
        ft_dir,
        tmp_path / "d.bdelta",
        CompressOptions(codec=BitDeltaOptions(planes=planes, scale_mode=scale)),
    )
    delta = DeltaFile.open(tmp_path / "d.bdelta")
    base, ft = _state(base_dir), _state(ft_dir)
    out = apply_delta(base_dir, tmp_path / "d.bdelta", tmp_path / "out")
    got = _state(out.out_dir)
    assert set(got) == set(base)
    for name in base:
        entry = delta.entries.get(name)
        if entry is None:
            assert torch.equal(got[name], base[name]), name
        elif entry.kind == "full":
            assert torch.equal(got[name], ft[name]), name
        else:
            want = reconstruct(base[name], delta.sign(name), delta.scale(name), torch.float32)
            assert torch.equal(got[name], want), name
    # BitDelta defaults: block linears binarized, embeddings / lm_head / norms dense.
    assert all(".layers." in n and n.endswith("proj.weight") for n in report.binarized)
    assert "model.embed_tokens.weight" in report.dense and "lm_head.weight" in report.dense
    assert "model.norm.weight" in report.dense
    assert report.base_fingerprint == Checkpoint.open(base_dir).fingerprint()


def test_two_planes_beat_one(llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    ft = _state(ft_dir)
    errors = {}
    for planes in (1, 2):
        compress(
            base_dir,
            ft_dir,
            tmp_path / f"{planes}.bdelta",
            CompressOptions(codec=BitDeltaOptions(planes=planes)),
        )
        got = _state(apply_delta(base_dir, tmp_path / f"{planes}.bdelta", tmp_path / f"out{planes}").out_dir)
        errors[planes] = sum(float((got[n] - ft[n]).norm() ** 2) for n in ft if ".layers." in n)
    assert errors[2] < errors[1]


def test_applied_model_loads_in_transformers(llama_pair, tmp_path):
    from transformers import LlamaForCausalLM

    base_dir, ft_dir = llama_pair
    compress(base_dir, ft_dir, tmp_path / "d.bdelta")
    out = apply_delta(base_dir, tmp_path / "d.bdelta", tmp_path / "out").out_dir
    model = LlamaForCausalLM.from_pretrained(out).eval()
    ft_model = LlamaForCausalLM.from_pretrained(ft_dir).eval()
    base_model = LlamaForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, base_logits = model(ids).logits, ft_model(ids).logits, base_model(ids).logits
    # The 1-bit model is much closer to the fine-tune than the base is.
    assert (got - want).norm() < 0.5 * (base_logits - want).norm()


def test_tied_embeddings_fp16(llama_pair_fp16_tied, tmp_path):
    from transformers import LlamaForCausalLM

    base_dir, ft_dir = llama_pair_fp16_tied
    assert "lm_head.weight" not in Checkpoint.open(base_dir)
    report = compress(base_dir, ft_dir, tmp_path / "d.bdelta", CompressOptions(include=("*embed_tokens*",)))
    assert "model.embed_tokens.weight" in report.binarized
    assert DeltaFile.open(tmp_path / "d.bdelta").dtype_name == "float16"
    out = apply_delta(base_dir, tmp_path / "d.bdelta", tmp_path / "out").out_dir
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float16)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # The in-memory fingerprint of the loaded base equals the file fingerprint (tied alias excluded).
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float16)
    sd = {k: v for k, v in base.state_dict().items() if k != "lm_head.weight"}
    assert fingerprint_tensors(sd.items()) == report.base_fingerprint


def test_unchanged_tensors_are_omitted(llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    base, ft = _state(base_dir), _state(ft_dir)
    state = dict(base)
    state["model.layers.0.mlp.up_proj.weight"] = ft["model.layers.0.mlp.up_proj.weight"]
    state["model.norm.weight"] = ft["model.norm.weight"]
    save_file(state, mixed / "model.safetensors")
    report = compress(base_dir, mixed / "model.safetensors", tmp_path / "d.bdelta")
    assert report.binarized == ["model.layers.0.mlp.up_proj.weight"]
    assert report.dense == ["model.norm.weight"]
    assert set(DeltaFile.open(tmp_path / "d.bdelta").entries) == {
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
    }


def test_sharded_input_and_output(llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    # Re-shard the fine-tune across three files with an index, as HF does for big models.
    ft = _state(ft_dir)
    names = sorted(ft)
    sharded = tmp_path / "ft_sharded"
    sharded.mkdir()
    weight_map = {}
    for i, chunk in enumerate(np.array_split(names, 3)):
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: ft[n] for n in chunk}, sharded / fname)
        weight_map.update({n: fname for n in chunk})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "config.json").write_text((ft_dir / "config.json").read_text())
    compress(base_dir, sharded, tmp_path / "a.bdelta")
    compress(base_dir, ft_dir, tmp_path / "b.bdelta")
    assert (tmp_path / "a.bdelta").read_bytes() == (tmp_path / "b.bdelta").read_bytes()

    out = apply_delta(base_dir, tmp_path / "a.bdelta", tmp_path / "out", max_shard_bytes=100_000)
    index = json.loads((out.out_dir / "model.safetensors.index.json").read_text())
    assert out.shards > 1 and len(set(index["weight_map"].values())) == out.shards
    assert set(index["weight_map"]) == set(ft)
    merged = {}
    for f in sorted(out.out_dir.glob("model-*.safetensors")):
        merged.update(load_file(f))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    single = _state(apply_delta(base_dir, tmp_path / "a.bdelta", tmp_path / "out1").out_dir)
    assert all(torch.equal(merged[n], single[n]) for n in single)


def test_compress_is_deterministic(llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    compress(base_dir, ft_dir, tmp_path / "a.bdelta")
    compress(base_dir, ft_dir, tmp_path / "b.bdelta")
    assert (tmp_path / "a.bdelta").read_bytes() == (tmp_path / "b.bdelta").read_bytes()


def test_resized_vocabulary_is_stored_full(llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    ft = _state(ft_dir)
    ft["model.embed_tokens.weight"] = torch.cat([ft["model.embed_tokens.weight"], torch.randn(8, 64)])
    ft["lm_head.weight"] = torch.cat([ft["lm_head.weight"], torch.randn(8, 64)])
    (tmp_path / "ft").mkdir()
    save_file(ft, tmp_path / "ft" / "model.safetensors")
    report = compress(
        base_dir, tmp_path / "ft", tmp_path / "d.bdelta", CompressOptions(include=("*embed_tokens*",))
    )
    assert "model.embed_tokens.weight" in report.dense  # shapes differ: cannot be a sign delta
    got = _state(apply_delta(base_dir, tmp_path / "d.bdelta", tmp_path / "out").out_dir)
    assert got["model.embed_tokens.weight"].shape == (392, 64)


def test_wrong_base_is_refused_and_nothing_is_written(llama_pair, tmp_path):
    from tests.support.model_pairs import make_llama_pair

    base_dir, ft_dir = llama_pair
    other_base, _ = make_llama_pair(tmp_path / "other", seed=5)
    compress(base_dir, ft_dir, tmp_path / "d.bdelta")
    with pytest.raises(BaseMismatchError) as info:
        apply_delta(other_base, tmp_path / "d.bdelta", tmp_path / "out")
    assert info.value.expected == Checkpoint.open(base_dir).fingerprint()
    assert info.value.actual == Checkpoint.open(other_base).fingerprint()
    assert info.value.expected in str(info.value) and info.value.actual in str(info.value)
    assert "--force" not in str(info.value)  # the CLI's advice belongs to the CLI (cli/errors.py)
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.incomplete") for p in tmp_path.iterdir())
    # --force applies it anyway.
    report = apply_delta(other_base, tmp_path / "d.bdelta", tmp_path / "out", force=True)
    assert (report.out_dir / "model.safetensors").exists()


def test_apply_refuses_nonempty_output(llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    compress(base_dir, ft_dir, tmp_path / "d.bdelta")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(CodecError, match="not an empty directory"):
        apply_delta(base_dir, tmp_path / "d.bdelta", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_finetune_with_extra_or_missing_tensors_is_refused(llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    ft = _state(ft_dir)
    save_file({**ft, "extra.weight": torch.zeros(2, 2)}, tmp_path / "extra.safetensors")
    with pytest.raises(IncompatibleDeltaError, match="extra.weight"):
        compress(base_dir, tmp_path / "extra.safetensors", tmp_path / "d.bdelta")
    ft.pop("model.norm.weight")
    save_file(ft, tmp_path / "missing.safetensors")
    with pytest.raises(IncompatibleDeltaError, match="model.norm.weight"):
        compress(base_dir, tmp_path / "missing.safetensors", tmp_path / "d.bdelta")
    assert not (tmp_path / "d.bdelta").exists()


def test_summary_reports_sizes_and_ratio(llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    report = compress(base_dir, ft_dir, tmp_path / "d.bdelta", CompressOptions(base_name="org/tiny"))
    info = summarize(tmp_path / "d.bdelta")
    assert info["base_model"] == "org/tiny"
    assert info["file_bytes"] == report.delta_bytes
    assert info["finetuned_bytes"] == Checkpoint.open(ft_dir).total_bytes
    assert info["ratio"] == pytest.approx(report.ratio)
    assert info["counts"] == {
        "bitdelta": len(report.binarized),
        "deltadq": 0,
        "hybrid": 0,
        "lowrank-mp": 0,
        "full": len(report.dense),
    }
    assert 1.0 < info["bits_per_binarized_weight"] < 1.1


def test_compress_options_are_validated():
    with pytest.raises(CodecError, match="between 1 and 8"):
        CompressOptions(codec=BitDeltaOptions(planes=0))
    with pytest.raises(CodecError, match="per-matrix"):
        CompressOptions(codec=BitDeltaOptions(scale_mode="per-column"))  # type: ignore[arg-type]
