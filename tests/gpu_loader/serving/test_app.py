"""The OpenAI-compatible server over real HTTP with the official `openai` client: tokens equal HF
`generate` on the reconstructed models while deltas and the base share the batch, streaming equals
non-streaming, and every error has its status and OpenAI-shaped body."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from tests.gpu_loader.serving.conftest import BASE_NAME, REPOS, prompt_ids


def complete(client, model: str, prompt: list[int], max_tokens: int, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def tokens_of(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def test_greedy_tokens_equal_generate_with_three_deltas_and_base_in_flight(world, server, client):
    _, serving = server
    jobs = []  # (tenant short name or None, model, prompt, max_tokens, start delay)
    for i in range(8):
        short = [None, "d1", "d2", "d3"][i % 4]
        model = BASE_NAME if short is None else REPOS[short]
        # Starts 30 ms apart, each 40+ tokens long: the first four (base, d1, d2, d3) overlap however
        # fast a step is, and the last four join a running batch.
        jobs.append((short, model, prompt_ids(100 + i, 5 + 7 * i % 30), 40 + (i % 3) * 10, 0.03 * i))
    results: dict[int, object] = {}
    peak = {"tenants": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            running = {s.req.tenant for s in list(serving.engine._running)}
            peak["tenants"] = max(peak["tenants"], len(running))
            time.sleep(0.002)

    def run(i, job):
        time.sleep(job[4])
        results[i] = complete(client, job[1], job[2], job[3])

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert peak["tenants"] == 4, "three deltas and the base were never in one running batch"
    assert serving.engine.stats()["joined_mid_batch"] > 0
    for i, (short, model, prompt, max_tokens, _) in enumerate(jobs):
        got = results[i]
        assert got.model == model
        assert tokens_of(got.choices[0]) == world.reference(short, prompt, max_tokens), (
            f"request {i} ({model})"
        )
        assert got.usage.prompt_tokens == len(prompt)
        assert got.usage.completion_tokens == len(tokens_of(got.choices[0]))


def test_streaming_returns_the_same_tokens_and_text(world, client):
    prompt = prompt_ids(7, 12)
    whole = complete(client, REPOS["d2"], prompt, 24)
    chunks = list(complete(client, REPOS["d2"], prompt, 24, stream=True))
    streamed = [t for c in chunks for t in (c.choices[0].model_extra.get("token_ids") or [])]
    assert streamed == tokens_of(whole.choices[0]) == world.reference("d2", prompt, 24)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_uses_the_template_and_streams_the_same(world, server, client):
    _, serving = server
    messages = [{"role": "user", "content": "hi there"}]
    ids = serving.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    whole = client.chat.completions.create(model=REPOS["d3"], messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].model_extra["token_ids"] == world.reference("d3", ids, 10)
    assert whole.usage.prompt_tokens == len(ids)
    parts = list(
        client.chat.completions.create(
            model=REPOS["d3"], messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.choices[0].message.content


def test_stop_string_cuts_the_text_and_frees_the_sequence(server, client):
    _, serving = server
    prompt = prompt_ids(3, 8)
    full = complete(client, BASE_NAME, prompt, 30).choices[0].text
    if len(full) < 6:
        pytest.skip("the random model stopped too early for a stop string")
    stop = full[3:5]
    cut = complete(client, BASE_NAME, prompt, 30, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    prompt = prompt_ids(4, 6)
    a = client.completions.create(
        model=REPOS["d1"], prompt=prompt, max_tokens=12, temperature=0.9, top_p=0.9, seed=5
    )
    b = client.completions.create(
        model=REPOS["d1"], prompt=prompt, max_tokens=12, temperature=0.9, top_p=0.9, seed=5
    )
    assert tokens_of(a.choices[0]) == tokens_of(b.choices[0])


# --- errors --------------------------------------------------------------------------------------
def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        complete(client, "acme/nope", [1, 2, 3], 4)
    assert e.value.status_code == 404
    assert e.value.body["code"] == "model_not_found" and "acme/nope" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        complete(client, "not-a-ref", [1, 2, 3], 4)


def test_delta_of_another_base_is_400_naming_both_fingerprints(world, server, client):
    from codec.format import DeltaFile

    _, serving = server
    with DeltaFile.open(world.foreign) as d:
        theirs = d.base_fingerprint
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, "other/foreign", [1, 2, 3], 4)
    body = e.value.body
    assert body["code"] == "base_mismatch"
    assert theirs in body["message"] and serving.engine.dm.base_fingerprint in body["message"]


def test_context_overflow_is_400_with_the_numbers(client):
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, BASE_NAME, list(range(100)), 40)
    msg = e.value.body["message"]
    assert e.value.body["code"] == "context_length_exceeded"
    assert "128" in msg and "140" in msg and "100" in msg and "40" in msg


def test_unsupported_parameters_are_400_naming_them(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=BASE_NAME, prompt=[1, 2], max_tokens=2, n=2, best_of=3)
    assert e.value.body["code"] == "unsupported_parameter"
    assert "best_of" in e.value.body["message"] and "n" in e.value.body["message"].split(":")[1]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model=BASE_NAME, prompt=[1, 2], max_tokens=2, extra_body={"use_beam_search": True}
        )
    assert "use_beam_search" in e.value.body["message"]


def test_malformed_json_and_wrong_types_are_422(http):
    r = http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = http.post("/v1/completions", json={"model": BASE_NAME, "prompt": "x", "max_tokens": "many"})
    assert r.status_code == 422 and "max_tokens" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={"model": BASE_NAME, "messages": []})
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]


def test_api_key_is_required_on_v1(server):
    srv, _ = server
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_no_chat_template_is_400(server, client):
    _, serving = server
    saved, serving.tokenizer.chat_template = serving.tokenizer.chat_template, None
    try:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=BASE_NAME, messages=[{"role": "user", "content": "x"}], max_tokens=2
            )
        assert e.value.body["code"] == "no_chat_template"
    finally:
        serving.tokenizer.chat_template = saved


# --- models, admin, operations -------------------------------------------------------------------
def test_models_lists_base_resident_and_registry(client):
    complete(client, REPOS["d1"], [5, 6], 2)
    cards = {m.id: m for m in client.models.list().data}
    assert cards[BASE_NAME].model_extra["kind"] == "base"
    assert cards[REPOS["d1"]].model_extra["resident"] is True
    assert cards[REPOS["d1"]].model_extra["codec"] == "bitdelta"
    assert set(REPOS.values()) <= set(cards)
    assert "other/foreign" not in cards  # another base's repository


def test_admin_load_pin_unpin_unload(server, http):
    _, serving = server
    dm = serving.engine.dm
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "math", "lora_path": REPOS["d1"], "pin": True})
    assert r.status_code == 200, r.text
    slot = r.json()["slot"]
    assert {x["slot"]: x for x in dm.stats()["resident"]}[slot]["pinned"] is True
    assert http.post("/v1/unpin_lora_adapter", json={"lora_name": "math"}).status_code == 200
    assert {x["slot"]: x for x in dm.stats()["resident"]}[slot]["pinned"] is False
    r = http.post(
        "/v1/completions", json={"model": "math", "prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "math"}).status_code == 200
    assert slot not in {x["slot"] for x in dm.stats()["resident"]}
    r = httpx_post_without_key(server, "/v1/load_lora_adapter", {"lora_name": REPOS["d2"]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "acme/nope"})
    assert r.status_code == 404


def httpx_post_without_key(server, path, body):
    import httpx

    srv, _ = server
    return httpx.post(srv.url + path, json=body, timeout=30)


def test_health_ready_and_metrics(server, http, client):
    complete(client, BASE_NAME, [1, 2, 3], 3)
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").status_code == 200
    text = http.get("/metrics").text
    for name in (
        "deltastore_requests_total",
        "deltastore_prompt_tokens_total",
        "deltastore_generated_tokens_total",
        "deltastore_time_to_first_token_seconds_bucket",
        "deltastore_time_per_output_token_seconds_bucket",
        "deltastore_queue_depth",
        "deltastore_running_batch_size",
        "deltastore_slot_hits_total",
        "deltastore_slot_misses_total",
        "deltastore_slot_evictions_total",
        "deltastore_delta_load_seconds_bucket",
        "deltastore_decode_step_rows_bucket",
        "deltastore_decode_step_deltas_bucket",
    ):
        assert name in text, name
    assert 'deltastore_requests_total{endpoint="/v1/completions",status="200"}' in text
