"""DeltaDQ deltas in the loader: the slot form (mask decoded at load, codes in column order)
decodes bit-identically to the codec; merge mode is exactly the reconstructed model and restores
the base bit for bit; batches mixing DeltaDQ, BitDelta and -1 rows match, row by row, the models
`codec.apply.apply_delta` reconstructs (LOGIT_ATOL, as for BitDelta); the pool counts a DeltaDQ
delta's payload at its real size and refuses what does not fit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codec import deltadq as codec_dq
from codec.apply import apply_delta
from codec.compress import CompressOptions, DeltaDQOptions, compress
from codec.deltadq import DQParams
from codec.format import DeltaFile
from gpu_loader import BudgetError, DeltaDoesNotFitError, DeltaModel, SlotPoolFullError
from gpu_loader.deltadq import DQSource, payload_bytes, unpack_codes, unpack_mask
from gpu_loader.merge import dq_rows, merge_, unmerge_
from gpu_loader.modules import DeltaEmbedding, add_dq_matmul_

from .conftest import BACKENDS, LOGIT_ATOL, VOCAB, Family, assert_rows_match, bits, make_dm

INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


class _Tensors:
    """Stands in for a `DeltaFile` holding one DeltaDQ tensor (what `DQSource` reads)."""

    def __init__(self, codes, step, params, seed):
        self.codes, self.step, self.params, self.dq_seed = codes, step, params, seed

    def dq_params(self, name):
        return self.params

    def dq_codes(self, name):
        return self.codes

    def dq_step(self, name):
        return self.step


def encoded(out, inn, params, seed=42, base=None, gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    base = torch.randn(out, inn, generator=gen) if base is None else base
    ft = base.float() + 0.1 * torch.randn(out, inn, generator=gen)
    codes, step = codec_dq.encode(ft, base, "w", seed, params)
    return DQSource(_Tensors(codes, step, params, seed), "w", (out, inn)), codes, step


# (out, in, group size, kept per group, bits, parts): partial last groups (45 % 16, 33 % 16,
# 70 % 32), in = 1, codes straddling bytes (3 and 5 bits), 8-bit codes in 2 parts.
SHAPES = [
    (9, 45, 16, 4, 3, 3),
    (5, 1, 1, 1, 1, 1),
    (300, 70, 32, 8, 8, 2),
    (7, 100, 64, 16, 2, 1),
    (4, 33, 16, 8, 5, 1),
    (3, 64, 64, 32, 4, 2),
]


@pytest.mark.parametrize("out,inn,g,keep,nbits,parts", SHAPES)
def test_slot_form_decodes_bit_identically_to_the_codec(out, inn, g, keep, nbits, parts):
    params = DQParams(g, keep, nbits, parts)
    source, codes, step = encoded(out, inn, params)
    weight = source.build()
    want = codec_dq.decode(codes, step, "w", 42, params, inn)
    assert torch.equal(weight.decode().view(torch.int32), want.view(torch.int32))  # +0.0 off the mask too
    rows = torch.tensor([out - 1, 0, out - 1])
    assert torch.equal(weight.decode(rows), want[rows])
    assert torch.equal(weight.decode(slice(1, None)), want[1:])
    assert torch.equal(
        unpack_mask(weight.mask, inn), torch.from_numpy(codec_dq.keep_mask(42, "w", (out, inn), params))
    )
    assert weight.nbytes == payload_bytes(out, inn, params) == source.nbytes


@pytest.mark.parametrize("width", range(1, 9))
def test_unpack_codes_reads_codes_that_straddle_bytes(width):
    rng = np.random.default_rng(width)
    codes = rng.integers(0, 2**width, size=(3, 29), dtype=np.uint8)
    packed = torch.from_numpy(codec_dq.pack_codes(codes, width))
    assert torch.equal(unpack_codes(packed, width, 29), torch.from_numpy(codes).to(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_merge_of_a_deltadq_tensor_is_reconstruct_and_unmerge_restores_every_bit(dtype):
    params = DQParams(16, 8, 3, 1)
    base = (torch.randn(37, 45, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    base[5, ::3] = -0.0  # off the mask, (−0.0 + 0.0) is +0.0 in the reconstruction; restore must undo it
    source, codes, step = encoded(37, 45, params, base=base)
    weight = base.clone()
    record = merge_(weight, dq_rows(source.build()))
    want = torch.cat(list(codec_dq.reconstruct_blocks(base, codes, step, "w", 42, params, dtype)))
    assert torch.equal(weight.view(INT_VIEW[dtype]), want.view(INT_VIEW[dtype]))
    unmerge_(weight, record)
    assert torch.equal(weight.view(INT_VIEW[dtype]), base.view(INT_VIEW[dtype]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_decode_then_gemm_in_the_activation_dtype_stays_within_one_rounding(dtype):
    """The CUDA fp16/bf16 branch (Δ̂ decoded in the activation dtype, tensor-core GEMM), run on
    CPU, against the fp32 branch: they differ by the rounding of Δ̂ and of the product only."""
    params = DQParams(16, 4, 3, 1)
    source, codes, step = encoded(40, 64, params)
    weight = source.build()
    x = torch.randn(6, 64).to(dtype)
    y0 = torch.randn(6, 40).to(dtype)
    tokens = torch.tensor([0, 2, 5])
    low, full = y0.clone(), y0.clone()
    add_dq_matmul_(low, x, tokens, weight, in_activation_dtype=True)
    add_dq_matmul_(full, x, tokens, weight, in_activation_dtype=False)
    want = y0.float()
    want[tokens] += x[tokens].float() @ codec_dq.decode(codes, step, "w", 42, params, 64).T
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype] * (want.abs().max().item() + 1)
    torch.testing.assert_close(full.float(), want, rtol=0, atol=tol)
    torch.testing.assert_close(low.float(), want, rtol=0, atol=2 * tol)
    assert torch.equal(low[[1, 3, 4]], y0[[1, 3, 4]]) and torch.equal(full[[1, 3, 4]], y0[[1, 3, 4]])


# ---------------------------------------------------------------------------------------------
# DeltaModel
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["q", "r"])
def test_merged_mode_with_a_deltadq_delta_is_the_reconstructed_model(dq_family, ids, name):
    dm = make_dm(dq_family)
    before = bits(dm.model.state_dict())
    with dm.merged(dq_family.deltas[name]) as merged:
        logits = merged(ids)
    with torch.no_grad():
        want = dq_family.model(name)(ids).logits
    assert torch.equal(logits, want)
    after = bits(dm.model.state_dict())
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_batch_mixes_bitdelta_deltadq_and_base_rows(dq_family, backend):
    """a: BitDelta (2 planes, binarized embeddings); q, r: DeltaDQ (r also compresses the
    embeddings and lm_head); -1: the base. Each row matches its own reconstructed model."""
    dm = make_dm(dq_family, backend=backend)
    a, q, r = (dm.load(dq_family.deltas[n]) for n in "aqr")
    ids = torch.randint(0, VOCAB, (5, 6), generator=torch.Generator().manual_seed(4))
    logits = dm(ids, delta_ids=[q, a, -1, r, q])
    names = ["q", "a", "base", "r", "q"]
    assert_rows_match(logits, dq_family.reference_logits(names, ids), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_fp16_deltadq_embedding_reaches_lm_head(tied_dq_family, ids, backend):
    dm = make_dm(tied_dq_family, backend=backend)
    q, b = dm.load(tied_dq_family.deltas["q"]), dm.load(tied_dq_family.deltas["b"])
    logits = dm(ids, delta_ids=[q, -1, b])
    assert logits.dtype == torch.float16
    assert_rows_match(logits, tied_dq_family.reference_logits(["q", "base", "b"], ids), torch.float16)


def test_deltadq_embedding_rows_are_bit_exact(dq_family, ids):
    dm = make_dm(dq_family)
    r = dm.load(dq_family.deltas["r"])
    emb = dm.model.get_input_embeddings()
    assert isinstance(emb, DeltaEmbedding)
    captured = []
    emb.register_forward_hook(lambda mod, inp, out: captured.append(out.clone()))
    dm(ids, delta_ids=[-1, r, r])
    want = dq_family.model("r").get_input_embeddings().weight[ids]
    base = dq_family.model("base").get_input_embeddings().weight[ids]
    assert torch.equal(captured[0][1:], want[1:]) and torch.equal(captured[0][0], base[0])


def test_greedy_generation_with_mixed_codecs(dq_family, ids):
    """Prefill and one-token decode steps (KV cache) with DeltaDQ and BitDelta rows."""
    dm = make_dm(dq_family)
    q, b = dm.load(dq_family.deltas["q"]), dm.load(dq_family.deltas["b"])
    out = dm.generate(ids, delta_ids=[q, b, -1], max_new_tokens=3, do_sample=False)
    for i, name in enumerate(["q", "b", "base"]):
        with torch.no_grad():
            want = dq_family.model(name).generate(ids[i : i + 1], max_new_tokens=3, do_sample=False)
        assert torch.equal(out[i], want[0])


@pytest.fixture(scope="module")
def qwen_dq_family(qwen_family) -> Family:
    root = qwen_family.root
    fam = Family(root, qwen_family.base, dict(qwen_family.deltas), dict(qwen_family.applied))
    fam.deltas["q"] = compress(
        fam.base, root / "ft", root / "q.bdelta", CompressOptions(codec=DeltaDQOptions(ratio=16))
    ).path
    fam.applied["q"] = apply_delta(fam.base, fam.deltas["q"], root / "q-model").out_dir
    return fam


def test_qwen2_deltadq_rows_switch_biases_too(qwen_dq_family, ids):
    dm = make_dm(qwen_dq_family)
    a, q = dm.load(qwen_dq_family.deltas["a"]), dm.load(qwen_dq_family.deltas["q"])
    logits = dm(ids, delta_ids=[q, a, -1])
    assert_rows_match(logits, qwen_dq_family.reference_logits(["q", "a", "base"], ids), torch.float32)


# ---------------------------------------------------------------------------------------------
# the slot pool
# ---------------------------------------------------------------------------------------------
DENSE_EMBED_LM_HEAD = 2 * VOCAB * 64 * 4  # embed_tokens + lm_head kept dense (fp32)


def dq_payload(layout, path) -> int:
    """What a DeltaDQ delta's payload takes in a slot, from the file's parameters."""
    delta = DeltaFile.open(path)
    return sum(
        payload_bytes(*layout.sign[n], delta.dq_params(n))
        for n, e in delta.entries.items()
        if e.kind == "deltadq"
    )


def test_a_deltadq_slot_holds_the_file_decoded_and_counts_its_payload(dq_family):
    dm = make_dm(dq_family)
    q = dm.load(dq_family.deltas["q"])
    delta = DeltaFile.open(dq_family.deltas["q"])
    name = "model.layers.1.mlp.down_proj.weight"
    resident = dm.pool.view(int(q)).dq[name]
    want = codec_dq.decode(
        delta.dq_codes(name), delta.dq_step(name), name, delta.dq_seed, delta.dq_params(name), 184
    )
    assert torch.equal(resident.decode(), want)
    assert not dm.pool.words[name][q].any() and dm.pool.active[name][q] == 0  # the kernel skips it
    stats = dm.stats()
    (entry,) = stats["resident"]
    assert (
        entry["codec"] == "deltadq"
        and entry["dq_bytes"] == dq_payload(dm.pool.layout, dq_family.deltas["q"]) > 0
    )
    assert stats["dq_bytes_used"] == entry["dq_bytes"]
    assert stats["dense_bytes_used"] == DENSE_EMBED_LM_HEAD  # q keeps embed_tokens and lm_head dense
    dm.unload(q)
    assert dm.stats()["dq_bytes_used"] == 0 and dm.stats()["dense_bytes_used"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_table_only_slots_serve_deltadq_beside_sign_slots(dq_family, backend):
    probe = make_dm(dq_family).pool.layout
    room = (
        dq_payload(probe, dq_family.deltas["q"])
        + DENSE_EMBED_LM_HEAD
        + dq_payload(probe, dq_family.deltas["r"])
    )
    room += DENSE_EMBED_LM_HEAD  # then a (lm_head dense), later b (embed_tokens and lm_head dense)
    budget = probe.slot_bytes + 2 * probe.table_slot_bytes + room
    dm = make_dm(dq_family, backend=backend, max_slots=3, sign_slots=1, memory_budget=budget)
    stats = dm.stats()
    assert (stats["slots"], stats["sign_slots"]) == (3, 1)
    assert stats["fixed_bytes"] == probe.slot_bytes + 2 * probe.table_slot_bytes < 2 * probe.slot_bytes
    assert dm.pool.words["model.layers.0.mlp.up_proj.weight"].shape[0] == 1
    a = dm.load(dq_family.deltas["a"])
    q, r = dm.load(dq_family.deltas["q"]), dm.load(dq_family.deltas["r"])
    assert int(a) == 0 and {int(q), int(r)} == {1, 2}
    ids = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(8))
    logits = dm(ids, delta_ids=[r, a, q, -1])
    assert_rows_match(logits, dq_family.reference_logits(["r", "a", "q", "base"], ids), torch.float32)
    b = dm.load(dq_family.deltas["b"])  # the one sign slot: a goes, the DeltaDQ deltas stay
    assert int(b) == 0
    assert {e["key"] for e in dm.stats()["resident"]} == {str(dq_family.deltas[n]) for n in "bqr"}


def test_a_pool_without_sign_space_refuses_sign_deltas(dq_family):
    dm = make_dm(dq_family, max_slots=2, sign_slots=0)
    dm.load(dq_family.deltas["r"])
    with pytest.raises(DeltaDoesNotFitError, match="sign_slots"):
        dm.load(dq_family.deltas["a"])


def test_a_deltadq_payload_must_fit_the_room_beside_the_slots(dq_family):
    layout = make_dm(dq_family).pool.layout
    need = dq_payload(layout, dq_family.deltas["r"])  # r has no dense tensors
    small = make_dm(
        dq_family, max_slots=2, sign_slots=0, memory_budget=2 * layout.table_slot_bytes + need - 1
    )
    with pytest.raises(SlotPoolFullError, match="DeltaDQ payload"):
        small.load(dq_family.deltas["r"])
    assert small.stats()["slots_used"] == 0 and small.stats()["dq_bytes_used"] == 0
    # room for r alone: loading q (payload + dense tensors) evicts r, the least recently used holder
    q_room = dq_payload(layout, dq_family.deltas["q"]) + DENSE_EMBED_LM_HEAD
    dm = make_dm(
        dq_family, max_slots=2, sign_slots=0, memory_budget=2 * layout.table_slot_bytes + max(need, q_room)
    )
    dm.load(dq_family.deltas["r"])
    dm.load(dq_family.deltas["q"])
    assert [e["key"] for e in dm.stats()["resident"]] == [str(dq_family.deltas["q"])]
    assert dm.stats()["dq_bytes_used"] + dm.stats()["dense_bytes_used"] == q_room


def test_budget_must_hold_the_slots_asked_for(dq_family):
    layout = make_dm(dq_family).pool.layout
    with pytest.raises(BudgetError, match="table-only"):
        make_dm(
            dq_family,
            max_slots=4,
            sign_slots=1,
            memory_budget=layout.slot_bytes + 2 * layout.table_slot_bytes,
        )
    with pytest.raises(BudgetError, match="between 0 and max_slots"):
        make_dm(dq_family, max_slots=2, sign_slots=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_mixed_codecs_table_only_slots_and_merge(tied_dq_family, ids):
    dm = DeltaModel.from_pretrained(
        tied_dq_family.base,
        device="cuda",
        dtype=torch.float16,
        max_planes=2,
        max_slots=3,
        sign_slots=1,
        memory_budget="256MiB",
    )
    assert dm.backend == "triton"
    try:
        q = dm.prefetch(tied_dq_family.deltas["q"]).result(timeout=120)
        a = dm.load(tied_dq_family.deltas["a"])
        logits = dm(ids.cuda(), delta_ids=[q, -1, a])
        assert_rows_match(
            logits.cpu(), tied_dq_family.reference_logits(["q", "base", "a"], ids), torch.float16
        )
        with dm.merged(tied_dq_family.deltas["q"]):
            merged = dm(ids.cuda())
        with torch.no_grad():
            want = tied_dq_family.model("q")(ids).logits
        torch.testing.assert_close(merged.cpu().float(), want.float(), rtol=0, atol=LOGIT_ATOL[torch.float16])
    finally:
        dm.close()
