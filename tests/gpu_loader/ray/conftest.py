"""Fixtures for the Ray Serve tests: a local Ray cluster with few CPUs (shut down with the module),
the app of `gpu_loader.ray_serve` on two replicas over the serving tests' tiny Llama and live
registry, and the single-node server on the same registry as the oracle."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.gpu_loader.serving.conftest import (  # noqa: F401
    API_KEY,
    BASE_NAME,
    World,
    registry,
    start_server,
    world,
)
from tests.support.harness import free_port

ray = pytest.importorskip("ray")


@dataclass
class RayCluster:
    url: str  # the Serve HTTP proxy
    metrics_url: str  # this node's Ray metrics agent (Prometheus text)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    from ray import serve

    metrics_port, http_port = free_port(), free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 500},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        yield RayCluster(f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        serve.shutdown()
        ray.shutdown()


def serve_args(world: World, registry_url: str, cache_dir: Path, **options):
    """The app's arguments over the tiny Llama and the live registry, on CPU with the test API key;
    `options` give the rest (replicas, slots, batch, queue...)."""
    from gpu_loader.ray_serve import ServeArgs

    return ServeArgs(
        base=str(world.base),
        base_name=BASE_NAME,
        registry=registry_url,
        cache_dir=str(cache_dir),
        device="cpu",
        memory_budget="64MiB",
        api_key=API_KEY,
        calibrate=False,
        **options,
    )


@contextmanager
def deployed(args, name: str) -> Iterator[None]:
    """The app of `args` under the route prefix /`name` for the block, deleted after it."""
    from ray import serve

    from gpu_loader.ray_serve import build_app

    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    try:
        yield
    finally:
        serve.delete(name)


@pytest.fixture(scope="module")
def ray_app(world, registry, ray_cluster, tmp_path_factory) -> RayCluster:  # noqa: F811
    from ray import serve

    from gpu_loader.ray_serve import build_app

    args = serve_args(
        world,
        registry.url,
        tmp_path_factory.mktemp("ray-cache"),
        replicas=2,
        max_slots=4,
        max_batch_size=8,
        max_batch_tokens=24,
        max_queue=32,
        num_cpus_per_replica=1,
    )
    serve.run(build_app(args), name="deltastore", route_prefix="/")
    return ray_cluster


@pytest.fixture(scope="module")
def single_node(world, registry, tmp_path_factory):  # noqa: F811
    """The single-node server with the same engine options: what every Ray answer must equal."""
    srv, _ = start_server(
        world,
        registry.url,
        tmp_path_factory.mktemp("single-cache"),
        max_batch_size=8,
        max_batch_tokens=24,
        max_queue=32,
    )
    yield srv
    srv.stop()


def openai_client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
