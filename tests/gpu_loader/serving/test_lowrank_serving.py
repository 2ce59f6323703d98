"""The server with low-rank slots (`max_rank`): `hybrid` and `lowrank-mp` deltas, named by local
path, answer over real HTTP with the official `openai` client with the greedy tokens HF `generate`
gives on the models `deltactl apply` rebuilds from them, in one batch with a BitDelta delta."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest

from codec.apply import apply_delta
from codec.codecs.hybrid import HybridOptions
from codec.codecs.lowrank_mp import LowRankMPOptions
from codec.compress import CompressOptions, compress
from gpu_loader.serving.app import build_serving, create_app
from gpu_loader.serving.engine import EngineConfig
from tests.gpu_loader.serving.conftest import API_KEY, BASE_NAME, World, prompt_ids
from tests.support.live_registry import LiveServer

MAX_RANK = 64


@pytest.fixture(scope="module")
def lowrank_world(world: World, tmp_path_factory) -> World:
    """The serving world's base with d2's fine-tune as hybrid and d3's as lowrank-mp, applied."""
    root = tmp_path_factory.mktemp("lowrank-serving")
    codecs = {"hybrid": ("ft2", HybridOptions(rank=6)), "lowrank-mp": ("ft3", LowRankMPOptions(ratio=4))}
    deltas, applied = {"d1": world.deltas["d1"]}, {"d1": world.applied["d1"]}
    for name, (ft, options) in codecs.items():
        deltas[name] = compress(
            world.base,
            world.root / ft,
            root / f"{name}.bdelta",
            CompressOptions(base_name=BASE_NAME, codec=options),
        ).path
        applied[name] = apply_delta(world.base, deltas[name], root / f"{name}-model").out_dir
    return World(root, world.base, deltas, applied, world.foreign)


@pytest.fixture(scope="module")
def lowrank_client(lowrank_world):
    serving = build_serving(
        lowrank_world.base,
        base_name=BASE_NAME,
        device="cpu",
        max_slots=3,
        memory_budget="64MiB",
        max_rank=MAX_RANK,
        engine_config=EngineConfig(schedule="mixed"),
        api_key=API_KEY,
        allow_paths=True,
        calibrate=False,
    )
    server = LiveServer(create_app(serving))
    server.start()
    try:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    finally:
        server.stop()


def test_hybrid_and_lowrank_mp_deltas_serve_the_tokens_of_their_applied_models(lowrank_world, lowrank_client):
    jobs = [
        (name, prompt_ids(300 + i, 9 + 4 * i), 24) for i, name in enumerate(["hybrid", "lowrank-mp", "d1"])
    ]

    def run(job):
        name, prompt, max_tokens = job
        answer = lowrank_client.completions.create(
            model=str(lowrank_world.deltas[name]), prompt=prompt, max_tokens=max_tokens, temperature=0
        )
        return answer.choices[0].model_extra["token_ids"]

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:  # the three share the batch
        served = list(pool.map(run, jobs))
    for (name, prompt, max_tokens), tokens in zip(jobs, served, strict=True):
        assert tokens == lowrank_world.reference(name, prompt, max_tokens), name


def test_a_server_without_factor_space_refuses_a_lowrank_delta_by_name(world, lowrank_world):
    serving = build_serving(
        world.base,
        base_name=BASE_NAME,
        device="cpu",
        max_slots=2,
        memory_budget="64MiB",
        engine_config=EngineConfig(schedule="mixed"),
        api_key=API_KEY,
        allow_paths=True,
        calibrate=False,
    )
    server = LiveServer(create_app(serving))
    server.start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(
                model=str(lowrank_world.deltas["hybrid"]), prompt=[1, 2, 3], max_tokens=2, temperature=0
            )
        assert "max_rank" in err.value.message
    finally:
        server.stop()
