"""The engine driven step by step (no HTTP): per-tenant cap, chunked prefill beside running
decodes, timeouts, load errors, and the grouped (merged weights) schedule giving the same tokens."""

from __future__ import annotations

import time

import pytest

from codec.errors import BaseMismatchError
from gpu_loader import DeltaModel
from gpu_loader.serving.engine import (
    DECODE,
    Engine,
    EngineConfig,
    EngineRequest,
    FinishEvent,
    SamplingParams,
    TokenEvent,
)
from gpu_loader.serving.planner import StepCosts, StepPlanner
from tests.gpu_loader.serving.conftest import BYTE_EOS, prompt_ids


@pytest.fixture(scope="module")
def dm(world):
    model = DeltaModel.from_pretrained(world.base, device="cpu", max_slots=4, memory_budget="64MiB")
    yield model
    model.close()


class Collect:
    def __init__(self):
        self.tokens: list[int] = []
        self.finish: FinishEvent | None = None

    def __call__(self, event):
        if isinstance(event, TokenEvent):
            self.tokens.append(event.token_id)
        else:
            self.finish = event


def request(rid, tenant, prompt, max_tokens, delta=None, **kw) -> EngineRequest:
    stops = frozenset({2, BYTE_EOS})
    return EngineRequest(
        rid,
        tenant,
        tuple(prompt),
        SamplingParams(max_tokens, temperature=0, stop_token_ids=stops),
        delta=None if delta is None else str(delta),
        **kw,
    )


def run_until_done(engine: Engine, sinks, limit: int = 2000) -> None:
    for _ in range(limit):
        if all(s.finish is not None for s in sinks):
            return
        engine.step()
    raise AssertionError("requests did not finish")


def test_a_burst_of_one_tenant_leaves_room_for_another(world, dm):
    engine = Engine(dm, EngineConfig(max_batch_size=4, max_running_per_tenant=2))
    sinks = [Collect() for _ in range(7)]
    for i in range(6):
        engine.submit(request(f"a{i}", "acme/burst", prompt_ids(i, 5), 4, world.deltas["d1"]), sinks[i])
    engine.submit(request("b0", "beta/quiet", prompt_ids(9, 5), 4), sinks[6])
    dm.load(world.deltas["d1"])  # resident already: admission does not wait for the load
    engine.step()
    tenants = [s.req.tenant for s in engine._running]
    assert tenants.count("acme/burst") == 2 and "beta/quiet" in tenants
    run_until_done(engine, sinks)
    assert all(s.finish.reason in ("length", "stop") for s in sinks)
    assert engine.stats()["leases"] == 0


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(world, dm):
    engine = Engine(dm, EngineConfig(max_batch_size=4, max_batch_tokens=12, min_prefill_chunk=4))
    short, long = Collect(), Collect()
    engine.submit(request("s", "base", prompt_ids(1, 4), 30), short)
    engine.step()  # the short prompt is prefilled: it decodes from now on
    long_prompt = prompt_ids(2, 70)
    engine.submit(request("l", "acme/code", long_prompt, 6, world.deltas["d2"]), long)
    chunks = 0
    while long.tokens == [] and long.finish is None:
        before = len(short.tokens)
        engine.step()
        if engine._running and any(s.req.request_id == "l" and s.state == "prefill" for s in engine._running):
            chunks += 1
        if short.finish is None:
            assert len(short.tokens) == before + 1, "a running decode stalled behind the long prefill"
    assert chunks >= 70 // 11  # at most max_batch_tokens - 1 prompt tokens per step
    run_until_done(engine, [short, long])
    assert short.tokens == world.reference(None, prompt_ids(1, 4), 30)
    assert long.tokens == world.reference("d2", long_prompt, 6)


def test_timeout_finishes_the_request_and_frees_its_lease(world, dm):
    engine = Engine(dm, EngineConfig())
    sink = Collect()
    # No stop tokens: only the deadline can end it before its 100 tokens, however fast a step is.
    req = EngineRequest(
        "t",
        "acme/math",
        tuple(prompt_ids(3, 5)),
        SamplingParams(100, temperature=0),
        delta=str(world.deltas["d1"]),
        timeout=0.5,
    )
    engine.submit(req, sink)
    for _ in range(50):
        engine.step()
        if engine.stats()["leases"] == 1:
            break
    assert engine.stats()["leases"] == 1 and sink.finish is None  # running, holding its slot lease
    time.sleep(0.6)
    run_until_done(engine, [sink])
    assert sink.finish.reason == "timeout" and len(sink.tokens) < 100
    assert engine.stats()["leases"] == 0 and engine.stats()["running"] == 0


def test_a_delta_of_another_base_fails_only_its_request(world, dm):
    engine = Engine(dm, EngineConfig())
    bad, good = Collect(), Collect()
    engine.submit(request("x", "other/foreign", [1, 2, 3], 4, world.foreign), bad)
    engine.submit(request("y", "base", [1, 2, 3], 4), good)
    run_until_done(engine, [bad, good])
    assert bad.finish.reason == "error" and isinstance(bad.finish.error, BaseMismatchError)
    assert good.finish.reason in ("length", "stop") and good.tokens


def test_grouped_schedule_gives_the_reconstructed_models_tokens(world, dm):
    engine = Engine(dm, EngineConfig(max_batch_size=4, schedule="grouped"))
    jobs = [
        (None, prompt_ids(20, 6)),
        ("d1", prompt_ids(21, 9)),
        ("d1", prompt_ids(22, 4)),
        ("d3", prompt_ids(23, 7)),
    ]
    sinks = [Collect() for _ in jobs]
    for i, (name, prompt) in enumerate(jobs):
        engine.submit(request(f"g{i}", name or "base", prompt, 10, world.deltas.get(name)), sinks[i])
    run_until_done(engine, sinks)
    engine.stop()  # restores the base weights
    for (name, prompt), sink in zip(jobs, sinks, strict=True):
        assert sink.tokens == world.reference(name, prompt, 10)
    assert engine.stats()["merged_delta"] is None


COSTS = StepCosts(base_fixed=0.010, base_row=0.001, delta_row=0.050, delta_distinct=0.0, merge=0.100)


def test_planner_picks_grouped_for_one_resident_merge_and_mixed_for_many_deltas():
    planner = StepPlanner(COSTS)
    one = ["a"] * 8
    assert planner.plan(one, merged="a").kind == "grouped"  # already merged: a plain base step
    assert planner.plan(one, merged=None).kind == "grouped"  # 0.1 s of merge < 8 × 50 ms
    many = [f"d{i}" for i in range(8)]
    assert planner.plan(many, merged=None).kind == "mixed"
    assert planner.plan([None] * 8, merged=None).kind in ("mixed", "grouped")
    cheap_slots = StepPlanner(StepCosts(0.010, 0.001, 0.0001, 0.0001, 0.100))
    assert cheap_slots.plan(one, merged=None).kind == "mixed"  # the GPU case: slots cost little


def test_planner_group_order_runs_the_merged_delta_first_then_base():
    assert StepPlanner.group_order(["b", None, "a", "b"], "a") == ["a", None, "b"]
    assert StepPlanner.group_order(["b", None], None) == [None, "b"]
    planner = StepPlanner(COSTS)
    order = ["a", None, "b"]
    # a is merged (free), restore before the base rows, merge b: two halves of a merge + three base steps
    expect = COSTS.merge + COSTS.base(1) + COSTS.base(1) + COSTS.base(2)
    assert planner.grouped_cost(["b", None, "a", "b"], order, "a") == pytest.approx(expect)


def test_planner_measures_positive_costs(dm):
    costs = StepPlanner.measure(dm, rows=4, context=8, reps=1).costs
    assert costs.merge > 0 and costs.base(4) > 0
    assert dm.stats()["slots_used"] == 0 or all("calib" not in r["key"] for r in dm.stats()["resident"])


def test_decode_totals_count_each_steps_rows_and_distinct_deltas(world, dm):
    engine = Engine(dm, EngineConfig(max_batch_size=8))
    sinks = [Collect() for _ in range(5)]
    for i, (tenant, delta) in enumerate(
        [
            ("a", world.deltas["d1"]),
            ("a", world.deltas["d1"]),
            ("b", world.deltas["d2"]),
            ("c", None),
            ("d", None),
        ]
    ):
        engine.submit(request(f"r{i}", tenant, prompt_ids(30 + i, 3 + i), 4 + 2 * i, delta), sinks[i])
    steps_with_deltas = 0
    for _ in range(200):
        if all(s.finish is not None for s in sinks):
            break
        decoding = [s for s in engine._running if s.state == DECODE]  # what this step decodes
        before = dict(engine.decode)
        engine.step()
        deltas = len({s.req.delta for s in decoding} - {None})
        steps_with_deltas += deltas > 1
        assert engine.decode["steps"] - before["steps"] == (1 if decoding else 0)
        assert engine.decode["rows"] - before["rows"] == len(decoding)
        assert engine.decode["deltas"] - before["deltas"] == deltas
        assert engine.decode["seconds"] >= before["seconds"]
    assert all(s.finish is not None for s in sinks)
    assert steps_with_deltas > 0  # some steps mixed both deltas
    # every generated token but each request's first (its prefill's) came from a decode row
    assert engine.decode["rows"] == sum(len(s.tokens) - 1 for s in sinks)
    assert engine.stats()["decode"] == engine.decode
