"""codec.checkpoint: one view of a model however its weights are laid out (a single file, one
shard, many shards with an index), one fingerprint for the same weights, and a clear refusal of
every malformed layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from codec.checkpoint import Checkpoint, fingerprint_tensors, tensor_bytes
from codec.errors import CheckpointError

TENSORS = {
    "model.embed_tokens.weight": torch.randn(11, 8),
    "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8).to(torch.float16),
    "model.layers.0.input_layernorm.weight": torch.ones(8, dtype=torch.bfloat16),
    "model.layers.1.mlp.up_proj.weight": torch.randn(16, 8),
    "lm_head.weight": torch.randn(11, 8),
}


def _sharded(root, groups: list[list[str]]):
    root.mkdir()
    weight_map = {}
    for i, names in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: TENSORS[n].contiguous() for n in names}, str(root / shard))
        weight_map.update({n: shard for n in names})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True}))
    return root


def test_every_layout_reads_the_same_tensors_with_one_fingerprint(tmp_path):
    save_file(TENSORS, str(tmp_path / "single.safetensors"))
    one_shard = tmp_path / "one"
    one_shard.mkdir()
    save_file(TENSORS, str(one_shard / "model.safetensors"))
    names = sorted(TENSORS)
    many = _sharded(tmp_path / "many", [names[:2], names[2:4], names[4:]])

    expected = fingerprint_tensors(TENSORS.items())
    for path in (tmp_path / "single.safetensors", one_shard, many):
        ckpt = Checkpoint.open(path)
        assert sorted(ckpt.names) == names
        assert ckpt.fingerprint() == expected, path
        for name, tensor in TENSORS.items():
            assert ckpt.get(name).dtype == tensor.dtype
            assert torch.equal(ckpt.get(name), tensor)
            assert b"".join(ckpt.raw_chunks(name, chunk=7)) == bytes(tensor_bytes(tensor))
        assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in TENSORS.values())
    assert len(Checkpoint.open(many).files) == 3
    assert Checkpoint.open(many).tied_embeddings and not Checkpoint.open(one_shard).tied_embeddings


def test_the_fingerprint_sees_names_dtypes_shapes_and_bytes():
    base = fingerprint_tensors(TENSORS.items())
    renamed = {("x." + k if k.startswith("lm_head") else k): v for k, v in TENSORS.items()}
    recast = dict(TENSORS, **{"lm_head.weight": TENSORS["lm_head.weight"].double()})
    reshaped = dict(TENSORS, **{"lm_head.weight": TENSORS["lm_head.weight"].reshape(8, 11)})
    flipped = dict(TENSORS, **{"lm_head.weight": TENSORS["lm_head.weight"].clone()})
    flipped["lm_head.weight"].view(torch.int32)[0, 0] ^= 1
    prints = {fingerprint_tensors(d.items()) for d in (renamed, recast, reshaped, flipped)}
    assert base not in prints and len(prints) == 4
    assert fingerprint_tensors(reversed(list(TENSORS.items()))) == base  # order of listing does not matter


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "no such file or directory"),
        (lambda d: d.mkdir(), "no *.safetensors weights"),
        (
            lambda d: (d.mkdir(), (d / "model.safetensors.index.json").write_text("{not json")),
            "malformed index",
        ),
        (
            lambda d: (
                d.mkdir(),
                (d / "model.safetensors.index.json").write_text(
                    json.dumps({"weight_map": {"a": "gone.safetensors"}})
                ),
            ),
            "shard listed in the index is missing",
        ),
        (
            lambda d: (
                d.mkdir(),
                (d / "model.safetensors.index.json").write_text(
                    json.dumps({"weight_map": {"a": "../x.safetensors"}})
                ),
            ),
            "is not a plain file name",
        ),
        (
            lambda d: (
                d.mkdir(),
                (d / "config.json").write_text("{"),
                save_file(TENSORS, str(d / "m.safetensors")),
            ),
            "unreadable config",
        ),
        (
            lambda d: (d.mkdir(), (d / "m.safetensors").write_bytes(b"\x00" * 3)),
            "not a valid safetensors file",
        ),
    ],
    ids=["missing", "empty-dir", "bad-index", "missing-shard", "shard-path", "bad-config", "not-safetensors"],
)
def test_malformed_layouts_are_refused_with_the_reason(tmp_path, make, message):
    target = tmp_path / "model"
    make(target)
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(target)
    assert message in str(err.value)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    d = tmp_path / "dup"
    d.mkdir()
    save_file({"a": torch.zeros(2)}, str(d / "one.safetensors"))
    save_file({"a": torch.ones(2)}, str(d / "two.safetensors"))
    with pytest.raises(
        CheckpointError, match="tensor 'a' appears in both one.safetensors and two.safetensors"
    ):
        Checkpoint.open(d)
