"""The delta-aware modules on their own: norms take the fused or per-group path, embedding rows
and rebuilt weights are bit-exact with the reconstructed model, the torch path's two ways of
adding a sign delta agree, and patching leaves the base state dict as it was."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from gpu_loader.modules import DeltaEmbedding, DeltaLinear, DeltaNorm

from .conftest import LOGIT_ATOL, VOCAB, assert_rows_match, make_dm


def test_norms_without_the_fused_path_run_per_slot_group(family, ids, monkeypatch):
    import gpu_loader.modules as modules

    monkeypatch.setattr(modules, "_rms_eps_if_llama_style", lambda m: None)
    dm = make_dm(family)
    assert all(m.rms_eps is None for m in dm.model.modules() if isinstance(m, DeltaNorm))
    a, b = dm.load(family.deltas["a"]), dm.load(family.deltas["b"])
    logits = dm(ids, delta_ids=[a, -1, b])
    assert_rows_match(logits, family.reference_logits(["a", "base", "b"], ids), torch.float32)


def test_llama_norms_take_the_fused_path(family):
    dm = make_dm(family)
    norms = [m for m in dm.model.modules() if isinstance(m, DeltaNorm)]
    assert len(norms) == 2 * 2 + 1 and all(m.rms_eps is not None for m in norms)


def test_binarized_embedding_rows_are_bit_exact(family, ids):
    dm = make_dm(family)
    a = dm.load(family.deltas["a"])
    captured = []
    emb = dm.model.get_input_embeddings()
    assert isinstance(emb, DeltaEmbedding)
    emb.register_forward_hook(lambda mod, inp, out: captured.append(out.clone()))
    dm(ids, delta_ids=[a, -1, a])
    want = family.model("a").get_input_embeddings().weight[ids]
    base = family.model("base").get_input_embeddings().weight[ids]
    assert torch.equal(captured[0][0], want[0]) and torch.equal(captured[0][2], want[2])
    assert torch.equal(captured[0][1], base[1])


def test_torch_path_rebuilds_slot_weights_exactly_like_apply(family):
    dm = make_dm(family)
    a = dm.load(family.deltas["a"])
    lin = dm.model.get_submodule("model.layers.1.mlp.down_proj")
    applied = family.model("a").get_submodule("model.layers.1.mlp.down_proj").weight
    assert torch.equal(lin.slot_weight(a), applied)
    assert torch.equal(lin.slot_weight(a, planes=2), applied)


def test_prefill_and_decode_sized_groups_agree(family, monkeypatch):
    """A slot with few tokens takes the table look-up path, with many the rebuilt-weight path."""
    import gpu_loader.modules as modules

    dm = make_dm(family)
    a = dm.load(family.deltas["a"])
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    lookup = dm(ids, delta_ids=[a, -1])
    monkeypatch.setattr(modules, "LUT_MAX_TOKENS", 0)
    rebuilt = dm(ids, delta_ids=[a, -1])
    torch.testing.assert_close(lookup, rebuilt, rtol=0, atol=LOGIT_ATOL[torch.float32])


def test_patching_keeps_the_base_state_dict(family):
    reference = AutoModelForCausalLM.from_pretrained(family.base).state_dict()
    dm = make_dm(family)
    state = dm.model.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    kinds = {type(m) for m in dm.model.modules()}
    assert {DeltaLinear, DeltaEmbedding, DeltaNorm} <= kinds and torch.nn.Linear not in kinds
