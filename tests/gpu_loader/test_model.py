"""End to end on CPU with small real Llama/Qwen2 models: a mixed batch through DeltaModel gives,
row by row, the logits of the models `codec.apply.apply_delta` reconstructs (and of the base for
-1 rows); merge mode gives exactly the reconstructed model and restores the base bit for bit.

Tolerance (stated): fp32 1e-4 absolute on logits, fp16 1e-2 absolute (LOGIT_ATOL in conftest);
the only difference is where Δ̂ is added (to the GEMM output instead of to the weight).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from codec.checkpoint import Checkpoint
from codec.errors import BaseMismatchError
from gpu_loader import DeltaModel, MergedModeError
from gpu_loader.modules import DeltaLinear
from tests.support.fake_hub import hub, hub_repos  # noqa: F401  (fixtures)

from .conftest import BACKENDS, LOGIT_ATOL, VOCAB, assert_rows_match, bits, make_dm


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_matches_reconstructed_models_row_by_row(family, ids, backend):
    dm = make_dm(family, backend=backend)
    a, b = dm.load(family.deltas["a"]), dm.load(family.deltas["b"])
    logits = dm(ids, delta_ids=[a, b, -1])
    assert logits.shape == (3, 7, VOCAB) and logits.dtype == torch.float32
    assert_rows_match(logits, family.reference_logits(["a", "b", "base"], ids), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_binarized_lm_head_and_repeated_slots(family, backend):
    """Delta c binarizes lm_head too (it goes through the kernel); a slot may serve many rows."""
    dm = make_dm(family, backend=backend)
    c, d = dm.load(family.deltas["c"]), dm.load(family.deltas["d"])
    ids = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(9))
    logits = dm(ids, delta_ids=[c, d, c, -1])
    assert_rows_match(logits, family.reference_logits(["c", "d", "c", "base"], ids), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_fp16_model(tied_family, ids, backend):
    """fp16 activations; the embedding is shared with lm_head, so a's binarized embedding delta
    must reach the logits through lm_head as well."""
    dm = make_dm(tied_family, backend=backend)
    a, b = dm.load(tied_family.deltas["a"]), dm.load(tied_family.deltas["b"])
    logits = dm(ids, delta_ids=[b, -1, a])
    assert logits.dtype == torch.float16
    assert_rows_match(logits, tied_family.reference_logits(["b", "base", "a"], ids), torch.float16)


def test_qwen2_biases_switch_per_slot(qwen_family, ids):
    dm = make_dm(qwen_family)
    a = dm.load(qwen_family.deltas["a"])
    assert any(isinstance(m, DeltaLinear) and m.bias is not None for m in dm.model.modules())
    logits = dm(ids, delta_ids=[-1, a, a])
    assert_rows_match(logits, qwen_family.reference_logits(["base", "a", "a"], ids), torch.float32)


def test_attention_mask_with_left_padding(family, ids):
    dm = make_dm(family)
    a, b = dm.load(family.deltas["a"]), dm.load(family.deltas["b"])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    logits = dm(ids, attention_mask=mask, delta_ids=[a, b, -1])
    refs = family.reference_logits(["a", "b", "base"], ids, attention_mask=mask)
    assert_rows_match(logits, refs, torch.float32, mask=mask)


def test_incremental_decoding_with_kv_cache(family, ids):
    dm = make_dm(family)
    a, b = dm.load(family.deltas["a"]), dm.load(family.deltas["b"])
    rows = [b, -1, a]
    out = dm.forward(ids, delta_ids=rows, use_cache=True)
    step = out.logits[:, -1].argmax(-1, keepdim=True)
    out2 = dm.forward(step, delta_ids=rows, cache=out.cache, use_cache=True)
    for i, name in enumerate(["b", "base", "a"]):
        model = family.model(name)
        with torch.no_grad():
            first = model(ids[i : i + 1], use_cache=True)
            second = model(step[i : i + 1], cache=first.cache, use_cache=True)
        torch.testing.assert_close(out2.logits[i], second.logits[0], rtol=0, atol=LOGIT_ATOL[torch.float32])


def test_greedy_generation_per_row(family, ids):
    dm = make_dm(family)
    a, b = dm.load(family.deltas["a"]), dm.load(family.deltas["b"])
    out = dm.generate(ids, delta_ids=[a, -1, b], max_new_tokens=4, do_sample=False)
    for i, name in enumerate(["a", "base", "b"]):
        with torch.no_grad():
            want = family.model(name).generate(ids[i : i + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(out[i], want[0])
    with pytest.raises(ValueError, match="num_beams"):
        dm.generate(ids, delta_ids=[a, -1, b], num_beams=2)


def test_delta_ids_may_be_a_tensor_and_all_base(family, ids):
    dm = make_dm(family)
    base = family.reference_logits(["base"] * 3, ids)
    assert_rows_match(dm(ids), base, torch.float32)
    assert_rows_match(dm(ids, delta_ids=torch.tensor([-1, -1, -1])), base, torch.float32)
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        dm(ids, delta_ids=[-1, -1])


@pytest.mark.parametrize("which", ["family", "tied_family"])
def test_in_memory_model_is_fingerprinted_like_its_checkpoint(which, request):
    fam = request.getfixturevalue(which)
    model = AutoModelForCausalLM.from_pretrained(fam.base, dtype="auto")
    dm = DeltaModel.from_pretrained(model, device="cpu", max_planes=2, memory_budget="64MiB", backend="torch")
    assert dm.base_fingerprint == Checkpoint.open(fam.base).fingerprint()
    dm.load(fam.deltas["a"])  # accepted: same base


@pytest.mark.parametrize("which", ["family", "tied_family"])
def test_merged_mode_is_the_reconstructed_model_and_restores_the_base_bit_for_bit(which, request, ids):
    fam = request.getfixturevalue(which)
    dm = make_dm(fam)
    before = bits(dm.model.state_dict())
    with dm.merged(fam.deltas["a"]) as merged:
        assert dm.stats()["merged"] == str(fam.deltas["a"])
        logits = merged(ids)
    with torch.no_grad():
        want = fam.model("a")(ids).logits
    assert torch.equal(logits, want)  # the merged weights are exactly the reconstructed ones
    after = bits(dm.model.state_dict())
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert dm.stats()["merged"] is None


def test_merged_mode_takes_no_slot_deltas_and_does_not_nest(family, ids):
    dm = make_dm(family)
    b = dm.load(family.deltas["b"])
    with dm.merged(family.deltas["a"]):
        with pytest.raises(MergedModeError, match="no slot deltas"):
            dm(ids, delta_ids=[b, -1, -1])
        with pytest.raises(MergedModeError, match="do not nest"):
            with dm.merged(family.deltas["b"]):
                pass
        dm.load(family.deltas["c"])  # loading slots stays allowed
    dm(ids, delta_ids=[b, -1, -1])


def test_merged_mode_restores_on_error_and_refuses_a_foreign_delta(family, foreign_delta, ids):
    dm = make_dm(family)
    before = bits(dm.model.state_dict())
    with pytest.raises(RuntimeError, match="boom"):
        with dm.merged(family.deltas["b"]):
            raise RuntimeError("boom")
    with pytest.raises(BaseMismatchError):
        with dm.merged(foreign_delta):
            pass
    after = bits(dm.model.state_dict())
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert dm.stats()["merged"] is None


def test_stats_report_the_pool(family):
    dm = make_dm(family)
    dm.pin(family.deltas["a"])
    s = dm.stats()
    assert s["backend"] == "torch" and s["slots"] == 4 and s["slots_used"] == 1 and s["slots_pinned"] == 1
    assert s["fixed_bytes"] == 4 * s["slot_bytes"] and s["budget_bytes"] == 64 << 20
    (entry,) = s["resident"]
    assert entry["pinned"] and entry["planes"] == 2 and entry["per_row"] and entry["base_model"]


def test_triton_backend_on_cpu_needs_the_interpreter(family, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        DeltaModel.from_pretrained(family.base, device="cpu", backend="triton", memory_budget="64MiB")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_mixed_batch_with_prefetch(tied_family, ids):
    dm = DeltaModel.from_pretrained(
        tied_family.base, device="cuda", dtype=torch.float16, max_planes=2, memory_budget="256MiB"
    )
    assert dm.backend == "triton"
    try:
        a = dm.prefetch(tied_family.deltas["a"]).result(timeout=60)
        b = dm.load(tied_family.deltas["b"])
        logits = dm(ids.cuda(), delta_ids=[b, -1, a])
        assert_rows_match(logits.cpu(), tied_family.reference_logits(["b", "base", "a"], ids), torch.float16)
    finally:
        dm.close()


def test_from_pretrained_takes_a_hub_id(hub, llama_pair):
    """A Hub id resolves through the Hub cache to the same base as its local directory."""
    base_dir, _ = llama_pair
    dm = DeltaModel.from_pretrained("org/base", device="cpu", memory_budget="16MiB", backend="torch")
    assert dm.base_fingerprint == Checkpoint.open(base_dir).fingerprint()
    ids = torch.tensor([[1, 5, 9, 3]])
    reference = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(dm(ids), reference(ids).logits, rtol=0, atol=LOGIT_ATOL[torch.float32])
