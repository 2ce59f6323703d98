"""Fixtures for the inference server tests: a tiny real Llama base with a byte tokenizer and a chat
template, three fine-tunes compressed to deltas and pushed to a live registry, the models
`deltactl apply` reconstructs from them (the oracle), and the server on a free loopback port."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from codec.apply import apply_delta
from codec.compress import CompressOptions, compress
from gpu_loader.serving.app import Serving, build_serving, create_app
from gpu_loader.serving.engine import EngineConfig
from tests.gpu_loader.conftest import perturb
from tests.support.live_registry import LiveServer, start_live_registry
from tests.support.model_pairs import make_llama_pair, save_byte_tokenizer

BASE_NAME = "test/tiny-llama"
API_KEY = "test-key"
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
BYTE_EOS = 256  # save_byte_tokenizer's "</s>"
REPOS = {"d1": "acme/math", "d2": "acme/code", "d3": "beta/chat"}


@dataclass
class World:
    root: Path
    base: Path
    deltas: dict[str, Path]  # short name -> .bdelta
    applied: dict[str, Path]  # short name -> reconstructed model dir
    foreign: Path  # a delta of another base
    _models: dict = field(default_factory=dict)

    def model(self, name: str | None):
        from transformers import AutoModelForCausalLM

        key = name or "base"
        if key not in self._models:
            path = self.base if name is None else self.applied[name]
            self._models[key] = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
        return self._models[key]

    def reference(self, name: str | None, prompt: list[int], max_tokens: int) -> list[int]:
        """Greedy tokens of HF `generate` on the base or on the model `deltactl apply` rebuilt,
        stopping at the same tokens as the server (the model's EOS and the tokenizer's)."""
        model = self.model(name)
        stops = sorted({model.generation_config.eos_token_id, BYTE_EOS} - {None})
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=stops[0],
            )
        tokens = out[0, len(prompt) :].tolist()
        for i, t in enumerate(tokens):  # generate pads after the first stop token
            if t in stops:
                return tokens[: i + 1]
        return tokens


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("serving")
    base, ft1 = make_llama_pair(root, seed=0)
    save_byte_tokenizer(base)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(base)
    fts = {"d1": ft1, "d2": perturb(base, root / "ft2", seed=11), "d3": perturb(base, root / "ft3", seed=12)}
    deltas, applied = {}, {}
    for name, ft in fts.items():
        deltas[name] = compress(base, ft, root / f"{name}.bdelta", CompressOptions(base_name=BASE_NAME)).path
        applied[name] = apply_delta(base, deltas[name], root / f"{name}-model").out_dir
    other_base, other_ft = make_llama_pair(root / "other", seed=7)
    foreign = compress(
        other_base, other_ft, root / "foreign.bdelta", CompressOptions(base_name="test/other-llama")
    ).path
    w = World(root, base, deltas, applied, foreign)
    w.other_base = other_base
    return w


@pytest.fixture(scope="module")
def registry(world, tmp_path_factory) -> Iterator[LiveServer]:
    """A live registry (SQLite + local blobs) holding the base and the three deltas, plus the
    foreign delta under a repository of its own base."""
    from registry.client.api import RegistryApi
    from registry.server.settings import Settings

    data = tmp_path_factory.mktemp("registry")
    server = start_live_registry(
        Settings(data_dir=data, database_url=f"sqlite:///{data}/registry.db"), migrate_first=True
    )
    with RegistryApi(server.url, home=data / "pusher") as api:
        api.register_base_from_checkpoint(BASE_NAME, world.base)
        api.register_base_from_checkpoint("test/other-llama", world.other_base)
        for name, repo in REPOS.items():
            api.push(world.deltas[name], repo)
        api.push(world.deltas["d1"], "acme/once")
        api.push(world.foreign, "other/foreign")
    yield server
    server.stop()


def start_server(world: World, registry_url: str | None, home: Path, **engine) -> tuple[LiveServer, Serving]:
    from registry.client.api import RegistryApi

    api = RegistryApi(registry_url, home=home) if registry_url else None
    serving = build_serving(
        world.base,
        base_name=BASE_NAME,
        device="cpu",
        max_slots=4,
        memory_budget="64MiB",
        engine_config=EngineConfig(**engine),
        registry_api=api,
        api_key=API_KEY,
        calibrate=False,
    )
    server = LiveServer(create_app(serving))
    server.start()
    return server, serving


@pytest.fixture(scope="module")
def server(world, registry, tmp_path_factory) -> Iterator[tuple[LiveServer, Serving]]:
    srv, serving = start_server(
        world,
        registry.url,
        tmp_path_factory.mktemp("cache"),
        max_batch_size=8,
        max_batch_tokens=24,
        max_queue=32,
    )
    yield srv, serving
    srv.stop()


@pytest.fixture
def client(server):
    import openai

    srv, _ = server
    with openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    srv, _ = server
    with httpx.Client(base_url=srv.url, timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def prompt_ids(seed: int, n: int) -> list[int]:
    """`n` byte-token ids (0..255: printable for the byte tokenizer)."""
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def serve_model_argv(base: Path, registry_url: str, port: int, *options: str) -> list[str]:
    """`deltactl serve-model BASE` as a child process: CPU, a small pool, API key `k`, on `port`."""
    return [
        sys.executable, "-m", "cli.main", "serve-model", str(base), *options,
        "--registry", registry_url, "--device", "cpu", "--memory-budget", "64MiB", "--max-slots", "4",
        "--port", str(port), "--api-key", "k", "--schedule", "mixed",
    ]  # fmt: skip


def wait_until_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    """Poll `url`/readyz until it answers 200; fail with the log's tail if the process exits or the
    time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
