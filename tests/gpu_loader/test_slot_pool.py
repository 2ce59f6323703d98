"""The slot pool behind DeltaModel: sizing by budget, LRU eviction, pinning, refusal of deltas
that do not belong or do not fit, ref resolution, prefetch and loads racing with forwards."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from codec.bitdelta import packed_width
from codec.errors import BaseMismatchError, InvalidDeltaError
from codec.format import DeltaFile
from gpu_loader import (
    BudgetError,
    DeltaDoesNotFitError,
    DeltaModel,
    NotLoadedError,
    SlotHandle,
    SlotPoolFullError,
    StaleSlotError,
    UnresolvedRefError,
)


def make_dm(family, **kw) -> DeltaModel:
    kw.setdefault("max_slots", 4)
    kw.setdefault("memory_budget", "64MiB")
    kw.setdefault("max_planes", 2)
    return DeltaModel.from_pretrained(family.base, device="cpu", backend="torch", **kw)


def resident_keys(dm) -> set[str]:
    return {r["key"] for r in dm.stats()["resident"]}


def test_slot_count_follows_budget_and_max_slots(family):
    one = make_dm(family).pool.layout.slot_bytes
    dm = make_dm(family, max_slots=8, memory_budget=int(2.5 * one))
    assert dm.stats()["slots"] == 2
    assert dm.pool.words["model.layers.0.mlp.up_proj.weight"].shape[0] == 2
    assert make_dm(family, max_slots=3, memory_budget="1GiB").stats()["slots"] == 3
    with pytest.raises(BudgetError, match="holds no delta slot"):
        make_dm(family, memory_budget=one - 1)


def test_slot_holds_packed_words_and_scales_of_the_file(family):
    dm = make_dm(family)
    slot = dm.load(family.deltas["a"])
    delta = DeltaFile.open(family.deltas["a"])
    name = "model.layers.1.self_attn.o_proj.weight"
    sign = delta.sign(name)  # [2, out, ceil(in/8)]
    words = dm.pool.words[name][slot]
    assert words.shape == (2, 64, 2)
    assert torch.equal(words.contiguous().view(torch.uint8)[:, :, : packed_width(64)], sign)
    assert torch.equal(dm.pool.scales[name][slot], delta.scale(name))
    assert dm.pool.active[name][slot] == 1


def test_unchanged_planes_are_zero_for_a_one_plane_delta(family):
    dm = make_dm(family)
    slot = dm.load(family.deltas["b"])
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not dm.pool.words[name][slot, 1].any() and not dm.pool.scales[name][slot, 1].any()
    assert (dm.pool.scales[name][slot, 0] == DeltaFile.open(family.deltas["b"]).scale(name)[0, 0]).all()


def test_loading_twice_reuses_the_slot(family):
    dm = make_dm(family)
    first = dm.load(family.deltas["a"])
    again = dm.load(str(family.deltas["a"]))
    assert int(first) == int(again) and first.generation == again.generation
    stats = dm.stats()
    assert (stats["loads"], stats["hits"], stats["slots_used"]) == (1, 1, 1)


def test_lru_eviction_and_stale_handles(family, ids):
    dm = make_dm(family, max_slots=2)
    a = dm.load(family.deltas["a"])
    b = dm.load(family.deltas["b"])
    dm(ids, delta_ids=[a, -1, -1])  # a is now more recently used than b
    c = dm.load(family.deltas["c"])
    assert int(c) == int(b)
    assert resident_keys(dm) == {str(family.deltas["a"]), str(family.deltas["c"])}
    assert dm.stats()["evictions"] == 1
    with pytest.raises(StaleSlotError, match="no longer holds"):
        dm(ids, delta_ids=[b, -1, -1])
    dm(ids, delta_ids=[int(b), -1, -1])  # a bare index means "whatever the slot holds now"


def test_pinned_deltas_are_never_evicted(family):
    dm = make_dm(family, max_slots=2)
    a = dm.pin(family.deltas["a"])
    dm.load(family.deltas["b"])
    dm.load(family.deltas["c"])  # evicts b, not the older but pinned a
    dm.load(family.deltas["d"])
    assert str(family.deltas["a"]) in resident_keys(dm)
    dm.pin(family.deltas["d"])
    with pytest.raises(SlotPoolFullError, match="2 pinned"):
        dm.load(family.deltas["b"])
    dm.unpin(a)
    dm.load(family.deltas["b"])
    assert str(family.deltas["a"]) not in resident_keys(dm)


def test_load_waits_for_a_slot_in_use_then_takes_it(family):
    dm = make_dm(family, max_slots=1, wait_timeout=0.2)
    a = dm.load(family.deltas["a"])
    rows, views = dm.pool.acquire([a])  # a forward holds slot a
    with pytest.raises(SlotPoolFullError, match="in use"):
        dm.load(family.deltas["b"])
    dm.pool.wait_timeout = 10.0
    timer = threading.Timer(0.3, dm.pool.release, args=(views,))
    timer.start()
    t0 = time.monotonic()
    b = dm.load(family.deltas["b"])
    assert time.monotonic() - t0 >= 0.25 and int(b) == int(a)
    timer.join()


def test_unload_keep_pinned_leaves_a_pinned_delta_and_frees_the_rest(family, ids):
    dm = make_dm(family)
    a, b = dm.pin(family.deltas["a"]), dm.load(family.deltas["b"])
    assert dm.unload(family.deltas["a"], keep_pinned=True) is False
    assert dm.unload(family.deltas["b"], keep_pinned=True) is True
    assert [r["slot"] for r in dm.stats()["resident"]] == [int(a)]
    dm(ids, delta_ids=[a, -1, -1])  # still usable
    with pytest.raises(StaleSlotError):
        dm(ids, delta_ids=[b, -1, -1])
    assert dm.unload(family.deltas["a"]) is True  # without keep_pinned a pin does not hold it
    assert dm.stats()["slots_used"] == 0


def test_unload_frees_the_slot(family, ids):
    dm = make_dm(family)
    a = dm.load(family.deltas["a"])
    dm.unload(family.deltas["a"])
    assert dm.stats()["slots_used"] == 0
    with pytest.raises(StaleSlotError):
        dm(ids, delta_ids=[a, -1, -1])
    with pytest.raises(NotLoadedError):
        dm.unload(family.deltas["a"])
    with pytest.raises(NotLoadedError, match="holds no delta"):
        dm(ids, delta_ids=[0, -1, -1])
    with pytest.raises(NotLoadedError, match="does not exist"):
        dm(ids, delta_ids=[99, -1, -1])


def test_delta_of_another_base_is_refused_before_any_copy(family, foreign_delta):
    dm = make_dm(family)
    with pytest.raises(BaseMismatchError, match="fingerprint") as err:
        dm.load(foreign_delta)
    assert err.value.actual == dm.base_fingerprint
    assert dm.stats()["slots_used"] == 0 and dm.stats()["loads"] == 0


def test_delta_with_more_planes_than_the_pool_is_refused(family):
    dm = make_dm(family, max_planes=1)
    with pytest.raises(DeltaDoesNotFitError, match="max_planes=2"):
        dm.load(family.deltas["a"])
    assert dm.stats()["slots_used"] == 0


def test_truncated_delta_is_refused(family, tmp_path):
    bad = tmp_path / "bad.bdelta"
    data = family.deltas["a"].read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    dm = make_dm(family)
    with pytest.raises(InvalidDeltaError):
        dm.load(bad)
    assert dm.stats()["slots_used"] == 0


def test_dense_tensors_need_room_beside_the_fixed_slots(family):
    one = make_dm(family).pool.layout.slot_bytes
    dm = make_dm(family, max_slots=1, memory_budget=one + 1000)
    with pytest.raises(SlotPoolFullError, match="dense tensors"):
        dm.load(family.deltas["b"])  # keeps embeddings and lm_head dense
    dm.load(family.deltas["c"])  # everything binarized: fits
    assert dm.stats()["dense_bytes_used"] == 0


def test_dense_budget_evicts_least_recently_used_dense_holders(family):
    one = make_dm(family).pool.layout.slot_bytes
    dense_b = 2 * 384 * 64 * 4  # embed_tokens + lm_head, fp32
    dm = make_dm(family, max_slots=3, memory_budget=3 * one + dense_b + 100)
    dm.load(family.deltas["b"])
    dm.load(family.deltas["c"])
    dm.load(family.deltas["d"])  # needs the dense room b holds: b goes
    assert resident_keys(dm) == {str(family.deltas["c"]), str(family.deltas["d"])}
    assert dm.stats()["dense_bytes_used"] == dense_b


def test_registry_refs_need_a_resolver(family):
    dm = make_dm(family)
    with pytest.raises(UnresolvedRefError, match="no resolver"):
        dm.load("acme/math:prod")
    with pytest.raises(UnresolvedRefError, match="no resolver"):
        dm.load("acme/code@3")


def test_registry_refs_go_through_the_resolver(family, ids):
    table = {
        "acme/math:prod": family.deltas["a"],
        "acme/math@1": family.deltas["a"],
        "acme/chat": family.deltas["b"],
    }
    dm = make_dm(family, resolver=lambda ref: table[ref])
    slot = dm.load("acme/math:prod")
    assert int(dm.load("acme/math@1")) == int(slot)  # same file, same slot
    (entry,) = dm.stats()["resident"]
    assert entry["refs"] == ["acme/math:prod", "acme/math@1"]
    dm.pin("acme/math:prod")
    assert dm.stats()["slots_pinned"] == 1
    dm.unload("acme/math@1")
    assert dm.stats()["slots_used"] == 0
    logits = dm(ids, delta_ids=["acme/chat", -1, "acme/chat"])  # refs in delta_ids load on demand
    assert logits.shape == (3, 7, 384) and dm.stats()["slots_used"] == 1
    with pytest.raises(UnresolvedRefError, match="acme/nope:prod"):
        dm.load("acme/nope:prod")  # the resolver's KeyError, named


def test_prefetch_loads_in_the_background(family, ids, foreign_delta):
    dm = make_dm(family)
    try:
        fut = dm.prefetch(family.deltas["a"])
        handle = fut.result(timeout=60)
        assert isinstance(handle, SlotHandle)
        assert dm(ids, delta_ids=[handle, -1, -1]).shape == (3, 7, 384)
        with pytest.raises(BaseMismatchError):
            dm.prefetch(foreign_delta).result(timeout=60)
        assert dm.stats()["prefetches"] == 2
    finally:
        dm.close()


def test_concurrent_loads_of_one_file_share_the_work(family):
    dm = make_dm(family)
    handles, errors = [], []

    def load():
        try:
            handles.append(dm.load(family.deltas["a"]))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({int(h) for h in handles}) == 1
    assert dm.stats()["loads"] == 1


def test_loads_on_other_threads_do_not_disturb_running_forwards(family, ids):
    dm = make_dm(family, max_slots=3)
    a = dm.pin(family.deltas["a"])
    expected = dm(ids, delta_ids=[a, -1, a])
    stop, errors = threading.Event(), []

    def churn(names):
        try:
            while not stop.is_set():
                for name in names:
                    dm.load(family.deltas[name])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(n,)) for n in (("b", "c", "d"), ("d", "c", "b"))]
    for t in threads:
        t.start()
    try:
        for _ in range(12):
            assert torch.equal(dm(ids, delta_ids=[a, -1, a]), expected)
            mixed = dm(ids, delta_ids=[a, family.deltas["c"], -1])  # loads c on demand, racing the churn
            # same row, other batch mates: only the GEMM blocking differs
            torch.testing.assert_close(mixed[0], expected[0], rtol=0, atol=1e-5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert dm.stats()["evictions"] > 0
