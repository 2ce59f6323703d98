"""Low-rank slots end to end on a real tiny Llama: factors (and sign planes of a residual, the
hybrid form) staged as `codec.terms.LowRankTerm`s into a real SlotPool, served beside BitDelta,
DeltaDQ and base rows in one batch, each row against a model whose weights hold that row's dense
Δ̂; the factor space's budget and its refusals; merge of low-rank (+ sign) terms bit for bit.

Tolerance: the row-by-row logits tolerance of the other end-to-end tests (LOGIT_ATOL).
"""

from __future__ import annotations

import pytest
import torch

from codec.bitdelta import binarize, decode
from codec.errors import InvalidDeltaError
from codec.terms import LowRankTerm, SignTerm
from gpu_loader import BudgetError, DeltaDoesNotFitError, PoolLayout
from gpu_loader.merge import lowrank_rows, merge_, sign_rows, sum_rows, unmerge_

from .conftest import BACKENDS, LOGIT_ATOL, assert_rows_match, make_dm

MAX_RANK = 12
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


class TermDelta:
    """A delta of low-rank terms (rank 1..MAX_RANK, differing per tensor) on every compressed
    tensor of a pool layout, optionally plus 1-bit signs of a residual (the hybrid form), with
    each tensor's dense Δ̂ = b·a (+ signs) for the reference model."""

    def __init__(self, layout: PoolLayout, seed: int, hybrid: bool = False):
        gen = torch.Generator().manual_seed(seed)
        self.lowrank, self.sign, self.scale, self.dense = {}, {}, {}, {}
        for i, (name, (out, inn)) in enumerate(sorted(layout.sign.items())):
            r = 1 + (7 * i + seed) % MAX_RANK
            a = torch.randn(r, inn, generator=gen) / inn**0.5
            b = torch.randn(out, r, generator=gen) * 0.03
            self.lowrank[name] = LowRankTerm(r, lambda a=a, b=b: (a, b))
            delta = torch.matmul(b, a)
            if hybrid:
                resid = torch.randn(out, inn, generator=gen) * 0.01
                self.sign[name], self.scale[name] = binarize(resid, None, planes=1, scale_mode="per-row")
                delta = delta + decode(self.sign[name], self.scale[name], inn)
            self.dense[name] = delta

    def install(self, dm, key: str):
        staged = dm.pool.stage_tensors(key, sign=self.sign, scale=self.scale, lowrank=self.lowrank)
        return dm.pool.install(staged)

    def reference(self, family):
        """The base with W ← (W.float() + Δ̂).to(dtype) for every tensor of this delta."""
        model = family.model("base")
        with torch.no_grad():
            for name, delta in self.dense.items():
                p = model.get_parameter(name)
                p.copy_((p.float() + delta).to(p.dtype))
        return model


def logits_of(model, ids: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(ids[i : i + 1]).logits[0] for i in range(ids.shape[0])]


@pytest.mark.parametrize("tokens", [3, 10], ids=["decode-sized", "prefill-sized"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_batch_mixes_lowrank_hybrid_bitdelta_deltadq_and_base_rows(dq_family, backend, tokens):
    dm = make_dm(dq_family, backend=backend, max_rank=MAX_RANK)
    lowrank, hybrid = TermDelta(dm.pool.layout, seed=1), TermDelta(dm.pool.layout, seed=2, hybrid=True)
    lr, hy = lowrank.install(dm, "lowrank"), hybrid.install(dm, "hybrid")
    a, q = dm.load(dq_family.deltas["a"]), dm.load(dq_family.deltas["q"])
    ids = torch.randint(0, 384, (6, tokens), generator=torch.Generator().manual_seed(tokens))
    logits = dm(ids, delta_ids=[lr, hy, a, -1, q, lr])
    files = dq_family.reference_logits(["a", "base", "q"], ids[2:5])
    lr_ref, hy_ref = lowrank.reference(dq_family), hybrid.reference(dq_family)
    refs = [logits_of(lr_ref, ids[0:1])[0], logits_of(hy_ref, ids[1:2])[0], *files]
    refs.append(logits_of(lr_ref, ids[5:6])[0])
    assert_rows_match(logits, refs, torch.float32)
    # the low-rank rows really carry their delta (the check above could not pass on the base)
    base_row = dq_family.reference_logits(["base"], ids[0:1])[0]
    assert (refs[0] - base_row).abs().max() > 100 * LOGIT_ATOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_fp16_lowrank_embedding_reaches_lm_head(tied_family, ids, backend):
    """fp16 factors; the low-rank term on the shared embedding reaches the logits through lm_head."""
    dm = make_dm(tied_family, backend=backend, max_rank=MAX_RANK)
    assert dm.pool.layout.factor_dtype == torch.float16
    hybrid = TermDelta(dm.pool.layout, seed=3, hybrid=True)
    assert "model.embed_tokens.weight" in hybrid.lowrank
    hy, b = hybrid.install(dm, "hybrid"), dm.load(tied_family.deltas["b"])
    logits = dm(ids, delta_ids=[hy, b, -1])
    refs = [logits_of(hybrid.reference(tied_family), ids[0:1])[0]]
    refs += tied_family.reference_logits(["b", "base"], ids[1:])
    assert_rows_match(logits, refs, torch.float16)


def test_lowrank_embedding_rows_are_the_reconstruction_within_product_rounding(family, ids):
    """Looked-up rows of a low-rank (+ signs) embedding are (base_row.float() + Δ̂_row).to(dtype),
    up to the fp32 summation order of b[ids] @ a (a BLAS's, which differs from the full product's)."""
    dm = make_dm(family, max_rank=MAX_RANK)
    name = "model.embed_tokens.weight"
    deltas = [TermDelta(dm.pool.layout, seed=4), TermDelta(dm.pool.layout, seed=5, hybrid=True)]
    handles = [d.install(dm, f"d{i}") for i, d in enumerate(deltas)]
    emb = dm.model.get_input_embeddings()
    captured = []
    emb.register_forward_hook(lambda mod, inp, out: captured.append(out.clone()))
    dm(ids, delta_ids=[handles[0], -1, handles[1]])
    got = captured[0]
    base = emb.weight.detach()
    for row, d in ((0, deltas[0]), (2, deltas[1])):
        want = (base[ids[row]].float() + d.dense[name][ids[row]]).to(base.dtype)
        torch.testing.assert_close(got[row], want, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(got[row], base[ids[row]], rtol=0, atol=1e-4)
    assert torch.equal(got[1], base[ids[1]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_slot_reused_by_a_delta_without_factors_serves_no_stale_factors(family, ids, backend):
    dm = make_dm(family, backend=backend, max_rank=MAX_RANK, max_slots=1)
    TermDelta(dm.pool.layout, seed=6).install(dm, "lowrank")
    b = dm.load(family.deltas["b"])  # evicts the low-rank delta: same slot, no low-rank terms
    assert int(b) == 0 and not dm.pool.view(int(b)).lowrank
    assert_rows_match(
        dm(ids, delta_ids=[b, -1, b]), family.reference_logits(["b", "base", "b"], ids), torch.float32
    )


def test_factor_space_is_counted_in_every_slot():
    layout = PoolLayout(
        sign={"w": (10, 33)}, table={}, dense={}, planes=1, max_rank=8, factor_dtype=torch.float16
    )
    assert layout.factor_bytes("w") == 8 * (33 + 10) * 2 + 4
    assert layout.table_slot_bytes == 4 + layout.factor_bytes("w")
    assert layout.slot_bytes == layout.sign_bytes("w") + layout.table_slot_bytes
    assert PoolLayout(sign={"w": (10, 33)}, table={}, dense={}).factor_bytes("w") == 0


def test_stats_report_the_rank(family):
    dm = make_dm(family, max_rank=MAX_RANK)
    delta = TermDelta(dm.pool.layout, seed=7)
    staged = dm.pool.stage_tensors("lr", sign={}, scale={}, lowrank=delta.lowrank, info={"rank": MAX_RANK})
    assert staged.rank == max(t.rank for t in delta.lowrank.values())
    dm.pool.install(staged)
    stats = dm.stats()
    assert stats["max_rank"] == MAX_RANK and stats["resident"][0]["rank"] == MAX_RANK


def test_budget_that_holds_no_slot_with_factor_space_names_the_rank(family):
    with pytest.raises(
        BudgetError,
        match=r"one slot needs .* low-rank factors up to rank 4096\); raise memory_budget or lower max_rank",
    ):
        make_dm(family, max_rank=4096, memory_budget="16MiB")


def test_factors_the_slots_cannot_hold_are_refused_before_any_copy(family):
    small = make_dm(family, max_rank=4)
    plain = make_dm(family)
    delta = TermDelta(small.pool.layout, seed=8)
    rank = max(t.rank for t in delta.lowrank.values())
    with pytest.raises(
        DeltaDoesNotFitError, match=rf"holds factors up to rank 4; create the DeltaModel with max_rank={rank}"
    ):
        delta.install(small, "lr")
    with pytest.raises(
        DeltaDoesNotFitError, match=r"holds factors up to rank 0; create the DeltaModel with max_rank="
    ):
        delta.install(plain, "lr")
    assert small.stats()["slots_used"] == 0 and plain.stats()["slots_used"] == 0


@pytest.mark.parametrize(
    "factors,message",
    [
        (
            (torch.zeros(2, 63), torch.zeros(64, 2)),
            r"must be a \[2, 64\] and b \[64, 2\], got a \[2, 63\] and b \[64, 2\]",
        ),
        ((torch.full((2, 64), float("nan")), torch.zeros(64, 2)), "low-rank factor a values are not finite"),
        ((torch.zeros(2, 64), torch.full((64, 2), 1e6)), "low-rank factor b values overflow torch.float16"),
    ],
    ids=["shape", "nan", "overflow"],
)
def test_malformed_factors_are_refused_with_the_reason(tied_family, factors, message):
    dm = make_dm(tied_family, max_rank=4)  # fp16 factor space
    name = "model.layers.0.self_attn.q_proj.weight"
    assert dm.pool.layout.sign[name] == (64, 64)
    term = {name: LowRankTerm(2, lambda: factors)}
    with pytest.raises(InvalidDeltaError, match=message):
        dm.pool.stage_tensors("bad", sign={}, scale={}, lowrank=term)
    with pytest.raises(InvalidDeltaError, match="a rank must be >= 1"):
        dm.pool.stage_tensors("bad", sign={}, scale={}, lowrank={name: LowRankTerm(0, lambda: factors)})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("hybrid", [False, True], ids=["lowrank", "hybrid"])
def test_merge_of_lowrank_terms_is_the_blocked_reconstruction_and_unmerge_restores_every_bit(
    dtype, hybrid, monkeypatch
):
    """docs/lowrank.md: Δ̂ = torch.matmul(b[r:r+256], a) per 256-row block (+ the sign term), added
    to the base in fp32 and rounded once; merge steps of 7 rows must still give those bits."""
    import gpu_loader.merge as merge

    monkeypatch.setattr(merge, "_CHUNK_BYTES", 7 * 45 * 4)
    out, inn = 600, 45  # blocks of 256, 256 and 88 rows
    gen = torch.Generator().manual_seed(int(hybrid))
    base = (torch.randn(out, inn, generator=gen) * 0.05).to(dtype)
    a, b = torch.randn(5, inn, generator=gen) * 0.1, torch.randn(out, 5, generator=gen) * 0.1
    parts = [lowrank_rows(a, b, base.device)]
    delta = torch.cat([torch.matmul(b[r : r + 256], a) for r in range(0, out, 256)])
    if hybrid:
        sign, scale = binarize(
            torch.randn(out, inn, generator=gen) * 0.01, None, planes=2, scale_mode="per-row"
        )
        parts.append(sign_rows(sign, scale, inn, base.device))
        delta = delta + decode(sign, scale, inn)
    weight = base.clone()
    record = merge_(weight, sum_rows(parts))
    want = (base.float() + delta).to(dtype)
    assert torch.equal(weight.view(INT_VIEW[dtype]), want.view(INT_VIEW[dtype]))
    unmerge_(weight, record)
    assert torch.equal(weight.view(INT_VIEW[dtype]), base.view(INT_VIEW[dtype]))


@pytest.fixture
def hybrid_file(family, monkeypatch):
    """BitDelta file `b` as a hybrid codec describes it to the loader: every sign tensor's terms
    become (LowRankTerm, SignTerm) — a codec-side stand-in until a codec writes low-rank files;
    the file, its validation, staging, slots and merge are the real ones."""
    import codec.terms
    import gpu_loader.staging

    layout_of = {}

    def terms(delta, name):
        found = codec.terms.entry_terms(delta, name)
        if not found or not isinstance(found[0], codec.terms.SignTerm):
            return found
        out, inn = delta.header.tensors[name + ".sign"].shape[1], layout_of[name][1]
        seed = sum(map(ord, name))
        gen = torch.Generator().manual_seed(seed)
        r = 1 + seed % MAX_RANK
        a, b = torch.randn(r, inn, generator=gen) / inn**0.5, torch.randn(out, r, generator=gen) * 0.03
        return (LowRankTerm(r, lambda: (a, b)), *found)

    monkeypatch.setattr(gpu_loader.staging, "entry_terms", terms)
    return family.deltas["b"], layout_of


def test_a_hybrid_file_loads_serves_and_merges_through_its_terms(family, hybrid_file, ids):
    import gpu_loader.staging
    from codec.format import DeltaFile

    path, layout_of = hybrid_file
    dm = make_dm(family, max_rank=MAX_RANK)
    layout_of.update(dm.pool.layout.sign)
    with DeltaFile.open(path) as delta:
        split = gpu_loader.staging.delta_terms(delta)
        assert split.lowrank and set(split.lowrank) == set(split.sign)
        dense = {}
        for name, (lr, sg) in split.terms.items():
            a, b = lr.factors()
            sign, scale = delta.tensor(sg.sign_key), delta.tensor(sg.scale_key)
            dense[name] = torch.matmul(b, a) + decode(sign, scale, a.shape[1])
        fulls = {n: delta.full(n) for n in split.full}
    ref = family.model("base")
    with torch.no_grad():
        for name, d in dense.items():
            p = ref.get_parameter(name)
            p.copy_((p.float() + d).to(p.dtype))
        for name, t in fulls.items():
            ref.get_parameter(name).copy_(t)
    hy = dm.load(path)
    assert dm.stats()["resident"][0]["rank"] == max(t.rank for t in split.lowrank.values())
    logits = dm(ids, delta_ids=[hy, -1, hy])
    refs = [
        logits_of(ref, ids[0:1])[0],
        *family.reference_logits(["base"], ids[1:2]),
        logits_of(ref, ids[2:3])[0],
    ]
    assert_rows_match(logits, refs, torch.float32)
    before = {n: p.detach().clone() for n, p in dm.model.named_parameters()}
    with dm.merged(path):
        for name, d in dense.items():  # every tensor here has < 256 rows: one product block
            p = dm.plan.params[name]
            assert p.shape[0] <= 256
            want = (before_of(before, dm, name).float() + d).to(p.dtype)
            assert torch.equal(p.detach().view(torch.int32), want.view(torch.int32)), name
    assert all(
        torch.equal(p.view(torch.int32), before[n].view(torch.int32)) for n, p in dm.model.named_parameters()
    )


def before_of(before: dict, dm, name: str) -> torch.Tensor:
    """The pre-merge value of canonical parameter `name` (named_parameters may name a tied one otherwise)."""
    param = dm.plan.params[name]
    return next(before[n] for n, p in dm.model.named_parameters() if p is param)


def test_a_file_of_higher_rank_than_the_pool_is_refused_before_any_copy(family, hybrid_file):
    path, layout_of = hybrid_file
    dm = make_dm(family, max_rank=2)
    layout_of.update(dm.pool.layout.sign)
    with pytest.raises(
        DeltaDoesNotFitError, match=r"holds factors up to rank 2; create the DeltaModel with max_rank="
    ):
        dm.load(path)
    assert dm.stats()["slots_used"] == 0 and dm.stats()["loads"] == 0


def test_a_tensor_whose_codec_gives_no_terms_stays_at_base(family, ids, monkeypatch):
    """A codec may describe a compressed tensor by no term at all (Δ̂ = 0: its safety rule kept the
    base): the loader serves the rest of the delta and leaves that tensor at base."""
    import codec.terms
    import gpu_loader.staging

    zero = "model.layers.0.self_attn.q_proj.weight"
    real = codec.terms.entry_terms
    monkeypatch.setattr(gpu_loader.staging, "entry_terms", lambda d, n: () if n == zero else real(d, n))
    dm = make_dm(family)
    b = dm.load(family.deltas["b"])
    assert zero not in dm.pool.view(int(b)).sign
    ref = family.model("b")
    with torch.no_grad():
        ref.get_parameter(zero).copy_(family.model("base").get_parameter(zero))
    assert_rows_match(
        dm(ids, delta_ids=[b, -1, b]),
        [
            logits_of(ref, ids[0:1])[0],
            *family.reference_logits(["base"], ids[1:2]),
            logits_of(ref, ids[2:3])[0],
        ],
        torch.float32,
    )


# ------------------------------------------------------------------------------------------
# end to end with the codecs: files compressed with --codec hybrid / lowrank-mp, applied by `apply`
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lowrank_family(family):
    """`family` plus h: fine-tune 1 as hybrid (rank 6 + 1-bit signs, per-row scales), and
    m: fine-tune 3 as lowrank-mp at ratio 4 with the signs fallback off (every tensor low-rank)."""
    from codec.codecs.hybrid import HybridOptions
    from codec.codecs.lowrank_mp import LowRankMPOptions
    from codec.compress import CompressOptions

    from .conftest import _family

    root = family.root
    fam = _family(
        root,
        family.base,
        {
            "h": (root / "finetuned", CompressOptions(codec=HybridOptions(rank=6, scale_mode="per-row"))),
            "m": (root / "ft3", CompressOptions(codec=LowRankMPOptions(ratio=4, signs=False))),
        },
    )
    fam.deltas = {**family.deltas, **fam.deltas}
    fam.applied = {**family.applied, **fam.applied}
    return fam


def file_terms(path) -> dict:
    from codec.format import DeltaFile
    from gpu_loader.staging import delta_terms

    with DeltaFile.open(path) as delta:
        return delta_terms(delta).terms


def test_codec_files_describe_their_tensors_by_the_expected_terms(lowrank_family):
    hybrid, mp = file_terms(lowrank_family.deltas["h"]), file_terms(lowrank_family.deltas["m"])
    assert hybrid and all(tuple(map(type, t)) == (LowRankTerm, SignTerm) for t in hybrid.values())
    assert mp and all(tuple(map(type, t)) == (LowRankTerm,) for t in mp.values())
    assert {t[0].rank for t in hybrid.values()} == {6}


@pytest.mark.parametrize("backend", BACKENDS)
def test_hybrid_and_lowrank_mp_files_serve_in_one_batch_like_the_applied_models(lowrank_family, ids, backend):
    fam = lowrank_family
    ranks = {t[0].rank for n in ("h", "m") for t in file_terms(fam.deltas[n]).values()}
    dm = make_dm(fam, backend=backend, max_rank=max(ranks))  # lowrank-mp spends ratio 4 on ranks up to 64
    assert len(ranks) > 2  # ranks differ per tensor and per delta
    h, m, a = dm.load(fam.deltas["h"]), dm.load(fam.deltas["m"]), dm.load(fam.deltas["a"])
    batch = torch.cat([ids, ids[:1]])
    logits = dm(batch, delta_ids=[h, m, -1, a])
    assert_rows_match(logits, fam.reference_logits(["h", "m", "base", "a"], batch), torch.float32)
    for name in ("h", "m"):  # the check above could not pass on the base's logits
        row = fam.reference_logits([name], ids[:1])[0] - fam.reference_logits(["base"], ids[:1])[0]
        assert row.abs().max() > 100 * LOGIT_ATOL[torch.float32]


@pytest.mark.parametrize("name", ["h", "m"])
def test_merged_codec_file_is_the_applied_model_exactly_and_restores_the_base(lowrank_family, ids, name):
    fam = lowrank_family
    dm = make_dm(fam, max_rank=MAX_RANK)
    before = {n: p.detach().clone() for n, p in dm.model.named_parameters()}
    applied = fam.model(name).state_dict()
    with dm.merged(fam.deltas[name]):
        for n, p in dm.model.named_parameters():
            assert torch.equal(p.detach().view(torch.int32), applied[n].view(torch.int32)), n
        logits = dm(ids)
    with torch.no_grad():
        assert torch.equal(logits, fam.model(name)(ids).logits)
    assert all(
        torch.equal(p.view(torch.int32), before[n].view(torch.int32)) for n, p in dm.model.named_parameters()
    )


def test_greedy_tokens_of_hybrid_slots_equal_the_applied_model(lowrank_family, ids):
    fam = lowrank_family
    dm = make_dm(fam, max_rank=MAX_RANK)
    h = dm.load(fam.deltas["h"])
    out = dm.generate(ids, delta_ids=[h, -1, h], max_new_tokens=6, do_sample=False)
    for row, name in enumerate(["h", "base", "h"]):
        with torch.no_grad():
            want = fam.model(name).generate(ids[row : row + 1], max_new_tokens=6, do_sample=False)
        assert torch.equal(out[row], want[0]), row
