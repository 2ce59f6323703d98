"""Resources and the registry over real HTTP: a client that goes away frees its KV row and slot
lease at once, a full queue answers 429 with Retry-After, concurrent first requests for one ref
make one pull, and a registry that is down fails only refs that were never pulled."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.gpu_loader.serving.conftest import API_KEY, BASE_NAME, REPOS, prompt_ids, start_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def small_server(world, registry, tmp_path_factory):
    """One running sequence at most and one waiting: queue limits are reached on purpose."""
    srv, serving = start_server(
        world, registry.url, tmp_path_factory.mktemp("cache-small"), max_batch_size=1, max_queue=1
    )
    yield srv, serving
    srv.stop()


def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def idle(serving) -> bool:
    s = serving.engine.stats()
    return s["running"] == 0 and s["waiting"] == 0 and s["leases"] == 0


def long_stream(url: str, model: str):
    """A streamed completion long enough to still be running while the test acts."""
    body = {"model": model, "prompt": prompt_ids(1, 4), "max_tokens": 120, "temperature": 0, "stream": True}
    return httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=60)


def test_client_disconnect_frees_kv_row_and_lease_at_once(small_server):
    srv, serving = small_server
    before = serving.engine.stats()["finished"].get("cancelled", 0)
    with long_stream(srv.url, REPOS["d1"]) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert serving.engine.stats()["leases"] == 1
    wait_until(lambda: idle(serving), timeout=5)
    stats = serving.engine.stats()
    assert stats["finished"]["cancelled"] == before + 1
    assert stats["free_kv_rows"] == 1
    assert all(not r["in_use"] for r in serving.engine.dm.stats()["resident"])


def test_full_queue_is_429_with_retry_after(small_server, monkeypatch):
    srv, serving = small_server
    real_step = serving.engine.step

    def slow_step():  # the tiny model decodes 120 tokens in a blink: give the test time to act
        time.sleep(0.02)
        real_step()

    monkeypatch.setattr(serving.engine, "step", slow_step)
    waiter: dict = {}
    with long_stream(srv.url, BASE_NAME) as running:
        lines = running.iter_lines()  # kept referenced: dropping the iterator closes the connection
        next(line for line in lines if line.startswith("data:"))

        def queued():
            body = {"model": BASE_NAME, "prompt": [1, 2], "max_tokens": 2}
            waiter["r"] = httpx.post(srv.url + "/v1/completions", json=body, headers=AUTH, timeout=60)

        t = threading.Thread(target=queued)
        t.start()
        wait_until(lambda: serving.engine.stats()["waiting"] == 1)
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=BASE_NAME, prompt=[1, 2], max_tokens=2)
        assert e.value.status_code == 429
        assert int(e.value.response.headers["Retry-After"]) >= 1
        assert e.value.body["code"] == "queue_full" and "1 of 1" in e.value.body["message"]
    t.join()
    assert waiter["r"].status_code == 200  # the queued request was served once the stream left
    wait_until(lambda: idle(serving))


def test_concurrent_first_requests_for_one_ref_make_one_pull(server):
    srv, serving = server
    before = serving.resolver.pulls
    barrier = threading.Barrier(6)
    codes = []

    def ask():
        barrier.wait()
        body = {"model": "acme/once", "prompt": [3, 4, 5], "max_tokens": 3, "temperature": 0}
        codes.append(httpx.post(srv.url + "/v1/completions", json=body, headers=AUTH, timeout=60).status_code)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 6
    assert serving.resolver.pulls == before + 1


def test_registry_down_serves_pulled_refs_and_503s_the_others(world, tmp_path):
    from gpu_loader.serving.refs import ModelResolver
    from registry.client.api import RegistryApi
    from registry.server.settings import Settings
    from tests.support.live_registry import start_live_registry

    data = tmp_path / "registry"
    reg = start_live_registry(
        Settings(data_dir=data, database_url=f"sqlite:///{data}/registry.db"), migrate_first=True
    )
    try:
        with RegistryApi(reg.url, home=tmp_path / "pusher") as api:
            api.register_base_from_checkpoint(BASE_NAME, world.base)
            api.push(world.deltas["d1"], "acme/math")
            api.push(world.deltas["d2"], "acme/code")
        srv, serving = start_server(world, reg.url, tmp_path / "cache")
    except BaseException:
        reg.stop()
        raise
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0)
        prompt = prompt_ids(9, 6)
        first = c.completions.create(model="acme/math", prompt=prompt, max_tokens=8, temperature=0)
        reg.stop()
        serving.resolver.refresh_seconds = 0  # look the tag up again: the registry is gone
        again = c.completions.create(model="acme/math", prompt=prompt, max_tokens=8, temperature=0)
        assert again.choices[0].model_extra["token_ids"] == first.choices[0].model_extra["token_ids"]
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="acme/code", prompt=prompt, max_tokens=8)
        assert e.value.status_code == 503 and e.value.body["code"] == "registry_unavailable"
        assert "acme/code" in e.value.body["message"]
        # a new process with the same cache: the pulled version is found offline
        offline = ModelResolver(
            base_name=BASE_NAME,
            base_fingerprint=serving.engine.dm.base_fingerprint,
            api=RegistryApi(reg.url, home=tmp_path / "cache"),
        )
        assert offline.resolve("acme/math").version == 1
    finally:
        srv.stop()
        reg.stop()
