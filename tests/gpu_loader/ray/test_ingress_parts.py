"""The pieces of the Ray deployment that need no cluster: the in-process ASGI bridge streams each
chunk as the app sends it and tells the app when its reader leaves, the ingress picks the delta ref
a request is routed by, and the documented Serve config file builds valid application arguments."""

from __future__ import annotations

import asyncio
import importlib
import json
from pathlib import Path

import pytest
import yaml
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from gpu_loader.ray_serve import ForwardedRequest, ResponseStart, ServeArgs, asgi_stream, routing_model

ROOT = Path(__file__).resolve().parents[3]


def streaming_app(release: asyncio.Event, log: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/stream")
    async def stream():
        async def body():
            try:
                yield b"first\n"
                await release.wait()
                yield b"second\n"
                log.append("finished")
            finally:
                log.append("closed")

        return StreamingResponse(body(), media_type="text/event-stream", headers={"x-from": "app"})

    @app.post("/v1/broken")
    async def broken():
        raise RuntimeError("the app failed")

    return app


def forwarded(path: str, body: bytes = b"{}") -> ForwardedRequest:
    return ForwardedRequest("POST", path, b"", [(b"content-type", b"application/json")], body)


def test_chunks_arrive_as_the_app_sends_them():
    async def scenario():
        release, log = asyncio.Event(), []
        req = forwarded("/v1/stream")
        it = asgi_stream(streaming_app(release, log), req.scope(), req.body)
        start = await it.__anext__()
        assert isinstance(start, ResponseStart) and start.status == 200
        assert (b"x-from", b"app") in start.headers
        assert await it.__anext__() == b"first\n"  # before the app is allowed to write the second
        release.set()
        assert [chunk async for chunk in it] == [b"second\n"]
        return log

    assert asyncio.run(scenario()) == ["finished", "closed"]


def test_a_reader_that_leaves_stops_the_app():
    async def scenario():
        release, log = asyncio.Event(), []
        req = forwarded("/v1/stream")
        it = asgi_stream(streaming_app(release, log), req.scope(), req.body)
        await it.__anext__()
        assert await it.__anext__() == b"first\n"
        await it.aclose()  # the client went away mid-stream
        return log

    assert asyncio.run(asyncio.wait_for(scenario(), 15)) == ["closed"]


def test_an_app_error_is_its_500_response():
    async def scenario():
        req = forwarded("/v1/broken")
        return [item async for item in asgi_stream(streaming_app(asyncio.Event(), []), req.scope(), req.body)]

    start, *body = asyncio.run(scenario())
    assert start.status == 500 and b"".join(body) == b"Internal Server Error"


@pytest.mark.parametrize(
    ("path", "body", "model"),
    [
        ("/v1/completions", {"model": "acme/math:prod", "prompt": "x"}, "acme/math:prod"),
        ("/v1/chat/completions", {"model": "acme/code@3", "messages": []}, "acme/code@3"),
        ("/v1/completions", {"model": "base/llama", "prompt": "x"}, None),  # the base: any replica
        ("/v1/completions", {"prompt": "x"}, None),
        ("/v1/completions", {"model": 5}, None),
        ("/v1/completions", {"model": ""}, None),
        ("/v1/completions", ["not", "an", "object"], None),
        ("/v1/load_lora_adapter", {"lora_name": "acme/math"}, "acme/math"),
        ("/v1/pin_lora_adapter", {"lora_name": "acme/math"}, "acme/math"),
        ("/v1/unload_lora_adapter", {"lora_name": "acme/math"}, "acme/math"),
        ("/v1/unpin_lora_adapter", {"lora_name": "base/llama"}, None),
        ("/v1/models", {"model": "acme/math"}, None),
    ],
)
def test_the_routing_model_is_the_requests_delta_ref(path, body, model):
    assert routing_model(path, json.dumps(body).encode(), "base/llama") == model


def test_a_body_that_is_not_json_is_routed_anywhere():
    assert routing_model("/v1/completions", b"{not json", "base/llama") is None


def test_the_documented_serve_config_builds_valid_arguments():
    config = yaml.safe_load((ROOT / "docs" / "ray-serve.yaml").read_text())
    (app,) = config["applications"]
    module, name = app["import_path"].split(":")
    from gpu_loader import ray_serve

    assert getattr(importlib.import_module(module), name) is ray_serve.build_app
    args = ServeArgs.model_validate(app["args"])
    assert args.gpus_per_replica == 1.0 and args.replicas == app["args"]["replicas"]
    with pytest.raises(ValueError, match="replicas"):
        ServeArgs.model_validate({**app["args"], "replicas": 0})
