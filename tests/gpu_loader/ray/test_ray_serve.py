"""The inference server scaled out on Ray Serve (two replicas, local cluster, real HTTP, the official
`openai` client): requests for a delta follow the replica that loaded it, every greedy answer equals
the single-node server's, streaming and errors are the single-node wire format, per-replica metrics
reach Ray's metrics, and a replica killed mid-request fails that request cleanly or retries it."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from gpu_loader.ray_serve import DELTA_CACHE_HEADER, REPLICA_HEADER
from tests.gpu_loader.ray.conftest import deployed, openai_client, serve_args
from tests.gpu_loader.serving.conftest import API_KEY, BASE_NAME, REPOS, prompt_ids

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


def complete(client, model: str, prompt: list[int], max_tokens: int, **kw):
    """(parsed completion, serving replica, delta cache outcome) of one greedy request."""
    raw = client.completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw
    )
    replica, outcome = raw.headers.get(REPLICA_HEADER), raw.headers.get(DELTA_CACHE_HEADER)
    return raw.parse(), replica, outcome


def tokens(completion) -> list[int]:
    return completion.choices[0].model_extra["token_ids"]


def single(client, model: str, prompt: list[int], max_tokens: int):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)


def test_requests_for_a_delta_follow_the_replica_that_loaded_it(ray_app, single_node):
    deltas = [REPOS["d1"], REPOS["d2"], REPOS["d3"]]
    with openai_client(ray_app.url) as ray_client, openai_client(single_node.url) as one:
        holder = {}
        for i, model in enumerate(deltas):  # the first request of each delta loads it somewhere
            got, holder[model], outcome = complete(ray_client, model, prompt_ids(i, 9), 12)
            assert outcome == "miss"
            assert tokens(got) == tokens(single(one, model, prompt_ids(i, 9), 12))
        assert len(set(holder.values())) == 2, "both replicas should serve: Ray spreads new deltas"
        jobs = [
            (model, prompt_ids(50 + i, 4 + 3 * i), 8 + i % 5)
            for i in range(12)
            for model in [(deltas + [BASE_NAME])[i % 4]]
        ]
        with ThreadPoolExecutor(6) as pool:  # followers arrive together, the base among them
            answers = list(pool.map(lambda j: complete(ray_client, *j), jobs))
            expected = list(pool.map(lambda j: single(one, *j), jobs))
    for (model, _, _), (got, replica, outcome), want in zip(jobs, answers, expected, strict=True):
        assert tokens(got) == tokens(want), f"{model} on {replica} differs from the single node"
        assert got.choices[0].text == want.choices[0].text
        if model == BASE_NAME:
            assert outcome is None and replica in holder.values()
        else:
            assert (replica, outcome) == (holder[model], "hit"), f"{model} left the replica that holds it"


def test_streaming_and_chat_equal_the_single_node(ray_app, single_node):
    prompt = prompt_ids(7, 12)
    with openai_client(ray_app.url) as ray_client, openai_client(single_node.url) as one:
        chunks = list(
            ray_client.completions.create(
                model=REPOS["d2"], prompt=prompt, max_tokens=24, temperature=0, stream=True
            )
        )
        whole = single(one, REPOS["d2"], prompt, 24)
        streamed = [t for c in chunks for t in (c.choices[0].model_extra.get("token_ids") or [])]
        assert len(chunks) > 2, "the stream arrived in one piece"
        assert streamed == tokens(whole)
        assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        messages = [{"role": "user", "content": "hi there"}]
        chat = [
            c.chat.completions.create(model=REPOS["d3"], messages=messages, max_tokens=10, temperature=0)
            for c in (ray_client, one)
        ]
        assert chat[0].choices[0].message.content == chat[1].choices[0].message.content
        assert chat[0].choices[0].model_extra["token_ids"] == chat[1].choices[0].model_extra["token_ids"]


@pytest.mark.parametrize(
    "request_args",
    [
        ("post", "/v1/completions", {"model": "nobody/nothing", "prompt": "hi", "max_tokens": 4}),
        ("post", "/v1/completions", {"model": REPOS["d1"], "prompt": "hi", "max_tokens": 4, "n": 3}),
        ("post", "/v1/completions", {"model": REPOS["d1"], "prompt": "hi", "max_tokens": 1000}),
        ("post", "/v1/completions", {"model": REPOS["d1"], "prompt": 5}),
        ("post", "/v1/chat/completions", b"{not json"),
        ("post", "/v1/completions", {"model": "other/foreign", "prompt": "hi", "max_tokens": 4}),
    ],
)
def test_errors_are_the_single_node_answers(ray_app, single_node, request_args):
    method, path, body = request_args
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    got = httpx.request(method, ray_app.url + path, headers=headers, timeout=60, **kw)
    want = httpx.request(method, single_node.url + path, headers=headers, timeout=60, **kw)
    assert got.status_code == want.status_code >= 400
    assert got.json() == want.json()
    assert set(got.json()["error"]) >= {"message", "type", "code"}


def test_api_key_is_checked_behind_ray(ray_app):
    got = httpx.post(ray_app.url + "/v1/completions", json={"model": BASE_NAME, "prompt": "hi"}, timeout=60)
    assert got.status_code == 401
    assert got.json()["error"]["code"] == "invalid_api_key"


def _replica_tag(name: str) -> str:
    return name.rsplit("#", 1)[-1]


def _scrape(url: str, metric: str) -> dict[tuple[str, str], float]:
    """(replica tag, outcome or "") -> value of one Ray metric, summed over the agent's series."""
    out: dict[tuple[str, str], float] = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith(metric + "{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            key = (labels.get("replica", ""), labels.get("outcome", ""))
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[-1])
    return out


def _settled(url: str, metric: str) -> dict[tuple[str, str], float]:
    """The metric once two scrapes 1.5 s apart agree (Ray's agent exports every 0.5 s)."""
    last = _scrape(url, metric)
    for _ in range(20):
        time.sleep(1.5)
        now = _scrape(url, metric)
        if now == last:
            return now
        last = now
    return last


def test_per_replica_hits_and_misses_reach_rays_metrics(ray_app):
    metric = "ray_deltastore_replica_delta_requests_total"
    before = _settled(ray_app.metrics_url, metric)
    sent: dict[tuple[str, str], int] = {}
    with openai_client(ray_app.url) as client:
        for i, model in enumerate([REPOS["d2"], REPOS["d2"], "acme/once", REPOS["d3"], BASE_NAME]):
            _, replica, outcome = complete(client, model, prompt_ids(200 + i, 5), 3)
            if outcome is not None:
                key = (_replica_tag(replica), outcome)
                sent[key] = sent.get(key, 0) + 1
    assert sum(sent.values()) == 4, "the base request is not a delta request"
    deadline = time.monotonic() + 20
    while True:
        got = _scrape(ray_app.metrics_url, metric)
        counted = {k: got.get(k, 0) - before.get(k, 0) for k in set(got) | set(before)}
        counted = {k: v for k, v in counted.items() if v}
        if counted == sent or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert counted == sent  # each answer counted once, under the replica and outcome its headers named
    resident = _scrape(ray_app.metrics_url, "ray_deltastore_replica_resident_deltas")
    assert {r for r, _ in sent} <= {r for r, _ in resident}
    assert all(v >= 1 for (r, _), v in resident.items() if r in {r for r, _ in sent})
    decode = {
        key: _scrape(ray_app.metrics_url, f"ray_deltastore_replica_decode_{key}_total")
        for key in ("steps", "rows", "step_deltas", "seconds")
    }
    for replica in {r for r, _ in sent}:  # each served >= 2 generated tokens: >= 1 decode step
        steps, rows, deltas = (decode[k].get((replica, ""), 0) for k in ("steps", "rows", "step_deltas"))
        assert steps >= 1 and rows >= steps and 1 <= deltas <= rows
        assert decode["seconds"].get((replica, ""), 0) > 0


def test_replica_killed_mid_request_fails_cleanly_and_later_requests_succeed(ray_app, single_node):
    model, prompt = REPOS["d1"], prompt_ids(3, 6)
    with openai_client(ray_app.url) as ray_client, openai_client(single_node.url) as one:
        want = single(one, model, prompt, 100)
        _, victim, _ = complete(ray_client, model, prompt_ids(1, 4), 2)
        stream = ray_client.completions.create(
            model=model, prompt=prompt, max_tokens=100, temperature=0, stream=True
        )
        first = next(iter(stream))
        assert first.choices
        background: dict = {}
        worker = threading.Thread(
            target=lambda: background.update(answer=complete(ray_client, model, prompt, 100))
        )
        worker.start()
        time.sleep(0.05)  # the non-streaming request reaches the victim (its stream has ~99 tokens to go)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        with pytest.raises(openai.APIError, match="replica"):
            for _ in stream:
                pass
        worker.join(timeout=120)
        got, replica, _ = background["answer"]  # nothing had been sent: another replica answered it
        assert replica != victim
        assert tokens(got) == tokens(want)
        later, replica, _ = complete(ray_client, model, prompt, 100)
        assert replica != victim and tokens(later) == tokens(want)


def test_an_admin_load_lands_where_the_deltas_requests_then_go(ray_app):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    loaded = httpx.post(
        ray_app.url + "/v1/load_lora_adapter", json={"lora_name": "acme/once"}, headers=headers, timeout=120
    )
    assert loaded.status_code == 200 and loaded.json()["status"] == "loaded", loaded.text
    with openai_client(ray_app.url) as client:
        for seed in (1, 2):
            _, replica, outcome = complete(client, "acme/once", prompt_ids(seed, 5), 4)
            assert (replica, outcome) == (loaded.headers[REPLICA_HEADER], "hit")


def test_a_full_wait_queue_is_429_behind_ray(world, registry, ray_app, tmp_path):  # noqa: F811
    """One replica taking one request at a time with room for one waiting: a burst of four gets the
    engine's 429 shape from the ingress (this app lives under a route prefix, too)."""
    args = serve_args(
        world,
        registry.url,
        tmp_path / "cache",
        replicas=1,
        max_slots=2,
        max_batch_size=1,
        max_queue=1,
        max_ongoing_requests=1,
        num_cpus_per_replica=0,
    )
    with deployed(args, "small"):
        body = {"model": BASE_NAME, "prompt": prompt_ids(9, 8), "max_tokens": 60, "temperature": 0}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(
                    lambda _: httpx.post(
                        ray_app.url + "/small/v1/completions", json=body, headers=headers, timeout=120
                    ),
                    range(4),
                )
            )
        codes = sorted(r.status_code for r in answers)
        assert codes[0] == 200 and codes[-1] == 429, codes
        refused = next(r for r in answers if r.status_code == 429)
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        assert "wait queue is full" in refused.json()["error"]["message"]


def test_rays_evictions_free_idle_deltas_and_keep_the_ones_requests_wait_for(
    world,
    registry,  # noqa: F811
    ray_app,
    tmp_path,
):
    """One replica with two slots (so Ray's cache holds two refs) decoding one row at a time, kept
    busy by base requests while delta requests queue behind them (FCFS; the engine loads a queued
    request's delta ahead while a slot can be had). Ray's LRU drops the ref routed here longest
    ago: an idle delta gives up its slot; a delta a queued request waits for stays resident (it is
    not read again) until that request ends."""
    args = serve_args(
        world,
        registry.url,
        tmp_path / "cache",
        replicas=1,
        max_slots=2,
        max_batch_size=1,
        max_queue=48,
        max_ongoing_requests=48,
        num_cpus_per_replica=0,
    )
    url = ray_app.url + "/evict"
    x, y, z = REPOS["d1"], REPOS["d2"], REPOS["d3"]
    loads = "ray_deltastore_replica_delta_loads_total"
    answers: dict[str, tuple] = {}

    def resident() -> set[str]:
        cards = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        return {c["id"] for c in cards.json()["data"] if c.get("source") == "resident"}

    def settle(want: set[str]) -> set[str]:
        deadline = time.monotonic() + 5
        while (now := resident()) != want and time.monotonic() < deadline:
            time.sleep(0.05)
        return now

    with deployed(args, "evict"):
        with openai_client(url) as client:

            def send(key: str, model: str, max_tokens: int) -> None:
                answers[key] = complete(client, model, prompt_ids(41, 8), max_tokens)

            send("x", x, 2)
            send("y", y, 2)  # Ray holds X, Y here; so does the pool
            replica = answers["x"][1]
            tag = _replica_tag(replica)
            before = _settled(ray_app.metrics_url, loads).get((tag, ""), 0)
            with ThreadPoolExecutor(36) as pool:
                # 30 x 110 tokens of base decoding ahead of the delta requests below (several seconds)
                busy = [pool.submit(send, f"base{i}", BASE_NAME, 110) for i in range(30)]
                time.sleep(0.3)
                queued = [pool.submit(send, "x again", x, 4)]  # waits; Ray now holds Y, X
                time.sleep(0.3)
                queued.append(pool.submit(send, "z", z, 4))  # Ray drops Y, which is idle
                after_z = settle({x, z})  # Z is loaded into Y's slot while it waits
                queued.append(pool.submit(send, "y again", y, 4))  # Ray drops X, which a request waits for
                time.sleep(0.5)
                after_y = resident()
                waited = "x again" not in answers
                for f in [*busy, *queued]:
                    f.result()
        assert waited, "the base requests ended before the checks: the test did not see X waiting"
        assert after_z == {x, z}
        assert after_y == {x, z}  # X stayed for the request waiting for it; Y waits for a slot
        assert {a[1] for a in answers.values()} == {replica}
        assert answers["x again"][2] == "hit"
        assert settle({z, y}) == {z, y}  # X left once its request ended
        deadline = time.monotonic() + 20
        while (got := _settled(ray_app.metrics_url, loads).get((tag, ""), 0) - before) < 2:
            if time.monotonic() > deadline:
                break
        assert got == 2  # Z and Y again; X was not read a second time
