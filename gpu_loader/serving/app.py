"""The OpenAI-compatible HTTP layer (FastAPI): translates /v1/completions, /v1/chat/completions
(streamed as server-sent events), /v1/models and the admin adapter calls into engine requests and
engine events back into OpenAI bodies; errors leave in OpenAI's `{"error": {...}}` shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from codec.errors import BaseMismatchError, IncompatibleDeltaError, InvalidDeltaError

from ..errors import NotLoadedError, SlotPoolFullError
from . import protocol as p
from .engine import (
    Engine,
    EngineConfig,
    EngineRequest,
    EngineStoppedError,
    FinishEvent,
    QueueFullError,
    SamplingParams,
    TokenEvent,
)
from .metrics import ServingMetrics
from .refs import ModelNotFoundError, ModelResolver, RegistryDownError, Resolved


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = p.ErrorResponse(
            error=p.ErrorBody(message=self.message, type=self.type, code=self.code, param=self.param)
        )
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


def api_error(exc: BaseException) -> ApiError:
    """The one place that turns what the resolver, the loader and the engine raise into HTTP."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ModelNotFoundError):
        return ApiError(404, str(exc), code="model_not_found", param="model")
    if isinstance(exc, BaseMismatchError):
        return ApiError(400, str(exc), code="base_mismatch", param="model")
    if isinstance(exc, (IncompatibleDeltaError, InvalidDeltaError)):
        return ApiError(400, str(exc), code="invalid_delta", param="model")
    if isinstance(exc, RegistryDownError):
        return ApiError(
            503,
            str(exc),
            type="service_unavailable",
            code="registry_unavailable",
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, QueueFullError):
        return ApiError(
            429,
            str(exc),
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(max(1, round(exc.retry_after)))},
        )
    if isinstance(exc, SlotPoolFullError):
        return ApiError(
            503, str(exc), type="service_unavailable", code="slots_busy", headers={"Retry-After": "1"}
        )
    if isinstance(exc, EngineStoppedError):
        return ApiError(503, str(exc), type="service_unavailable", code="shutting_down")
    if isinstance(exc, NotLoadedError):
        return ApiError(404, str(exc), code="not_resident")
    return ApiError(
        500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error"
    )


@dataclass
class ServerConfig:
    base_name: str
    api_key: str | None = None
    max_model_len: int | None = None  # default: the model config's max_position_embeddings


@dataclass
class Serving:
    """Everything one server process holds: the engine (over its DeltaModel), the tokenizer, the
    model resolver and the metrics."""

    engine: Engine
    tokenizer: Any
    resolver: ModelResolver
    config: ServerConfig
    metrics: ServingMetrics = field(default_factory=ServingMetrics)
    aliases: dict[str, str] = field(default_factory=dict)  # admin lora_name -> ref or path
    names: dict[str, set[str]] = field(default_factory=dict)  # delta path -> model names served from it
    _ids: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.metrics.watch(self.engine)
        self.engine.metrics = self.metrics
        cfg_len = getattr(self.engine.dm.model.config, "max_position_embeddings", None)
        self.max_model_len = self.config.max_model_len or cfg_len or self.engine.max_len
        gen = getattr(self.engine.dm.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.stop_token_ids = frozenset(int(e) for e in eos if e is not None)

    async def resolve(self, model: str) -> Resolved:
        ref = self.aliases.get(model, model)
        try:
            resolved = await run_in_threadpool(self.resolver.resolve, ref)
        except Exception as exc:
            raise api_error(exc) from exc
        if resolved.path is not None:
            self.names.setdefault(str(resolved.path), set()).add(model)
        return resolved

    def next_id(self) -> str:
        return f"req-{next(self._ids)}"


def _sse(obj: Any) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n"


class _Run:
    """One request in flight: engine events arrive on an asyncio queue; text is detokenized
    incrementally and cut at the first stop string (which then cancels the engine request)."""

    def __init__(self, serving: Serving, req: EngineRequest, stops: list[str]) -> None:
        self.serving, self.req, self.stops = serving, req, stops
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` handed out
        self.finish: FinishEvent | None = None
        self.reason: str | None = None
        self.arrived = time.perf_counter()
        self.first_token: float | None = None

    def sink(self, event) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def start(self) -> None:
        self.serving.engine.submit(self.req, self.sink)
        self.serving.metrics.prompt_tokens.inc(len(self.req.prompt_ids))

    def cancel(self) -> None:
        if self.finish is None:
            self.serving.engine.cancel(self.req.request_id)

    async def events(self, request: Request | None) -> AsyncIterator[tuple[str, list[int]]]:
        """(new text, new token ids) until the request finishes. With `request`, polls for the
        client leaving (a streamed response is cancelled by Starlette itself when it does)."""
        hold = max((len(s) for s in self.stops), default=1) - 1
        pending: list[int] = []
        while self.finish is None:
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.cancel()
                    raise asyncio.CancelledError from None
                continue
            if isinstance(event, TokenEvent):
                if self.first_token is None:
                    self.first_token = time.perf_counter()
                    self.serving.metrics.ttft.observe(self.first_token - self.arrived)
                if self.reason is not None:
                    continue  # past a stop string: the cancel is on its way
                self.tokens.append(event.token_id)
                pending.append(event.token_id)
                if event.token_id in self.req.params.stop_token_ids:
                    continue  # the stop token itself is not text
                self.text = self.serving.tokenizer.decode(self.tokens, skip_special_tokens=True)
                cut = self._stop_at()
                if cut is not None:
                    self.text, self.reason = self.text[:cut], "stop"
                    self.cancel()
                    out, self.sent = self.text[self.sent :], len(self.text)
                    yield out, pending
                    pending = []
                    continue
                safe = len(self.text) - hold
                if self.text.endswith("\ufffd"):
                    continue  # a multi-byte character is not complete yet
                if safe > self.sent:
                    out, self.sent = self.text[self.sent : safe], safe
                    yield out, pending
                    pending = []
            elif isinstance(event, FinishEvent):
                self.finish = event
        if self.reason is None:
            if self.finish.reason in ("error", "timeout"):
                raise self._finish_error()
            self.reason = {"cancelled": "abort"}.get(self.finish.reason, self.finish.reason)
        rest = self.text[self.sent :]
        self.sent = len(self.text)
        if rest or pending:
            yield rest, pending
        self._observe()

    def _stop_at(self) -> int | None:
        hits = [self.text.find(s, max(0, self.sent - len(s))) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None

    def _finish_error(self) -> ApiError:
        if self.finish.reason == "timeout":
            return ApiError(
                504,
                f"request {self.req.request_id} timed out after {len(self.tokens)} generated tokens",
                type="timeout",
                code="request_timeout",
            )
        return api_error(self.finish.error or RuntimeError("generation failed"))

    def usage(self) -> p.Usage:
        n = len(self.tokens)
        return p.Usage(
            prompt_tokens=len(self.req.prompt_ids),
            completion_tokens=n,
            total_tokens=len(self.req.prompt_ids) + n,
        )

    def _observe(self) -> None:
        m = self.serving.metrics
        m.generated_tokens.inc(len(self.tokens))
        if self.first_token is not None and len(self.tokens) > 1:
            m.tpot.observe((time.perf_counter() - self.first_token) / (len(self.tokens) - 1))


def create_app(serving: Serving) -> FastAPI:
    """The FastAPI app over a ready `Serving`; the engine thread runs for the app's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        serving.engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(serving.engine.stop)

    app = FastAPI(title="deltastore inference server", lifespan=lifespan)
    app.state.serving = serving

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        where = ", ".join(
            ".".join(str(x) for x in e["loc"] if x != "body") + f": {e['msg']}" for e in errors[:5]
        )
        return ApiError(422, f"invalid request: {where}", code="invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), code="http_error").response()

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next):
        path = request.url.path
        key = serving.config.api_key
        if key and path.startswith("/v1/") and request.headers.get("authorization") != f"Bearer {key}":
            response = ApiError(
                401,
                "missing or wrong API key (send Authorization: Bearer <key>)",
                type="authentication_error",
                code="invalid_api_key",
            ).response()
        else:
            response = await call_next(request)
        if path.startswith("/v1/"):
            serving.metrics.requests.labels(endpoint=path, status=str(response.status_code)).inc()
        return response

    # --- inference --------------------------------------------------------------------------
    async def prepare(body: p._Request, prompt_ids: list[int], default_max: int | None) -> _Run:
        bad = body.unsupported()
        if bad:
            raise ApiError(
                400,
                f"unsupported parameter(s): {', '.join(bad)} (this server generates one greedy "
                "or sampled sequence per request)",
                code="unsupported_parameter",
                param=bad[0],
            )
        resolved = await serving.resolve(body.model)
        limit = serving.max_model_len
        max_tokens = default_max if default_max is not None else max(1, limit - len(prompt_ids))
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", code="empty_prompt", param="prompt")
        if len(prompt_ids) + max_tokens > limit:
            raise ApiError(
                400,
                f"this model's context is {limit} tokens, but the request asks for "
                f"{len(prompt_ids) + max_tokens} ({len(prompt_ids)} in the prompt + {max_tokens} "
                "max_tokens); shorten the prompt or lower max_tokens",
                code="context_length_exceeded",
                param="max_tokens",
            )
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop_token_ids=serving.stop_token_ids,
        )
        req = EngineRequest(
            serving.next_id(),
            body.model,
            tuple(prompt_ids),
            params,
            delta=None if resolved.path is None else str(resolved.path),
        )
        run = _Run(serving, req, body.stop_list())
        try:
            run.start()
        except Exception as exc:
            raise api_error(exc) from exc
        return run

    def tokenize_prompt(body: p.CompletionRequest) -> list[int]:
        if isinstance(body.prompt, list):
            return list(body.prompt)
        return serving.tokenizer(body.prompt, add_special_tokens=True)["input_ids"]

    def tokenize_chat(body: p.ChatCompletionRequest) -> list[int]:
        tok = serving.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ApiError(
                400,
                f"model {serving.config.base_name!r} has no chat template; use /v1/completions",
                code="no_chat_template",
            )
        msgs = [m.model_dump() for m in body.messages]
        out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request):
        run = await prepare(body, tokenize_prompt(body), body.max_tokens)
        if body.stream:
            return stream(run, request, chat=False)
        try:
            async for _ in run.events(request):
                pass
        except asyncio.CancelledError:
            return Response(status_code=499)
        choice = p.CompletionChoice(text=run.text, finish_reason=run.reason, token_ids=run.tokens)
        return p.CompletionResponse(model=body.model, choices=[choice], usage=run.usage())

    @app.post("/v1/chat/completions")
    async def chat(body: p.ChatCompletionRequest, request: Request):
        run = await prepare(body, tokenize_chat(body), body.max_completion_tokens or body.max_tokens)
        if body.stream:
            return stream(run, request, chat=True)
        try:
            async for _ in run.events(request):
                pass
        except asyncio.CancelledError:
            return Response(status_code=499)
        choice = p.ChatChoice(
            message=p.ChatChoiceMessage(content=run.text), finish_reason=run.reason, token_ids=run.tokens
        )
        return p.ChatCompletionResponse(model=body.model, choices=[choice], usage=run.usage())

    def stream(run: _Run, request: Request, *, chat: bool) -> StreamingResponse:
        rid = ("chatcmpl-" if chat else "cmpl-") + run.req.request_id
        created = int(time.time())
        model = run.req.tenant

        def chunk(text: str | None, ids: list[int], finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = p.ChatDelta(role="assistant" if first else None, content=text)
                choice = p.ChatChunkChoice(delta=delta, finish_reason=finish, token_ids=ids)
                return p.ChatCompletionChunk(
                    id=rid, created=created, model=model, choices=[choice]
                ).model_dump(exclude_none=True)
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "text": text or "",
                        "finish_reason": finish,
                        "logprobs": None,
                        "token_ids": ids,
                    }
                ],
            }

        async def body() -> AsyncIterator[str]:
            try:
                if chat:
                    yield _sse(chunk("", [], None, first=True))
                async for text, ids in run.events(None):
                    yield _sse(chunk(text, ids, None))
                final = chunk(None if chat else "", [], run.reason)
                final["usage"] = run.usage().model_dump()
                yield _sse(final)
            except ApiError as exc:
                yield _sse({"error": {"message": exc.message, "type": exc.type, "code": exc.code}})
            finally:
                run.cancel()  # no-op once finished; frees KV and lease when the client went away
            yield _sse("[DONE]")

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    # --- models ---------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models() -> p.ModelList:
        dm = serving.engine.dm
        cards = [
            p.ModelCard(
                id=serving.config.base_name,
                kind="base",
                resident=True,
                source="base",
                base_fingerprint=dm.base_fingerprint,
            )
        ]
        seen = {serving.config.base_name}
        for r in dm.stats()["resident"]:
            for name in sorted(serving.names.get(r["key"], set()) or {r["key"]}):
                if name not in seen:
                    seen.add(name)
                    cards.append(
                        p.ModelCard(
                            id=name,
                            resident=True,
                            pinned=r["pinned"],
                            codec=r.get("codec"),
                            slot=r["slot"],
                            source="resident",
                            base_fingerprint=dm.base_fingerprint,
                        )
                    )
        for repo in await run_in_threadpool(serving.resolver.repositories):
            if repo.full_name not in seen:
                seen.add(repo.full_name)
                codec = repo.latest.codec if repo.latest else None
                cards.append(
                    p.ModelCard(id=repo.full_name, codec=codec, base_fingerprint=repo.base_fingerprint)
                )
        return p.ModelList(data=cards)

    # --- admin (vLLM's /v1/load_lora_adapter shape) -------------------------------------------
    async def admin_target(body: p.AdapterRequest) -> str:
        if body.lora_path and body.lora_path != body.lora_name:
            serving.aliases[body.lora_name] = body.lora_path
        resolved = await serving.resolve(body.lora_name)
        if resolved.path is None:
            raise ApiError(400, f"{body.lora_name!r} is the base model, not a delta", code="not_a_delta")
        return str(resolved.path)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: p.AdapterRequest):
        path = await admin_target(body)
        dm = serving.engine.dm
        try:
            t0 = time.perf_counter()
            handle = await run_in_threadpool(dm.pin if body.pin else dm.load, path)
            serving.metrics.delta_load.observe(time.perf_counter() - t0)
        except Exception as exc:
            raise api_error(exc) from exc
        return {"lora_name": body.lora_name, "slot": int(handle), "pinned": body.pin, "status": "loaded"}

    async def manage(body: p.AdapterRequest, action: str) -> dict:
        path = await admin_target(body)
        dm = serving.engine.dm
        try:
            await run_in_threadpool(getattr(dm, action), path)
        except Exception as exc:
            raise api_error(exc) from exc
        if action == "unload":
            serving.aliases.pop(body.lora_name, None)
        return {
            "lora_name": body.lora_name,
            "status": {"unload": "unloaded", "pin": "pinned", "unpin": "unpinned"}[action],
        }

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: p.AdapterRequest):
        return await manage(body, "unload")

    @app.post("/v1/pin_lora_adapter")
    async def pin_adapter(body: p.AdapterRequest):
        return await manage(body, "pin")

    @app.post("/v1/unpin_lora_adapter")
    async def unpin_adapter(body: p.AdapterRequest):
        return await manage(body, "unpin")

    # --- operations -------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not serving.engine.alive:
            return JSONResponse(
                {"status": "not ready", "reason": "the engine is not running"}, status_code=503
            )
        return {"status": "ready", **serving.engine.stats()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(serving.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def build_serving(
    base: str | os.PathLike[str],
    *,
    base_name: str | None = None,
    device: str | None = None,
    dtype=None,
    max_slots: int = 16,
    memory_budget: str | int = "4GiB",
    max_planes: int = 1,
    max_rank: int = 0,
    engine_config: EngineConfig | None = None,
    registry_api=None,
    api_key: str | None = None,
    allow_paths: bool = False,
    calibrate: bool = True,
    base_fingerprint: str | None = None,
) -> Serving:
    """Load the base into a `DeltaModel`, measure the step planner's costs (unless `calibrate` is
    False or the schedule is fixed) and wire engine, tokenizer and resolver together. `max_planes`
    and `max_rank` size every slot's sign and low-rank factor space (`DeltaModel.from_pretrained`)."""
    from transformers import AutoTokenizer

    from ..model import DeltaModel
    from .planner import StepPlanner

    resolver_api = registry_api
    dm = DeltaModel.from_pretrained(
        base,
        device=device,
        dtype=dtype,
        max_slots=max_slots,
        memory_budget=memory_budget,
        max_planes=max_planes,
        max_rank=max_rank,
        base_fingerprint=base_fingerprint,
    )
    config = engine_config or EngineConfig()
    planner = (
        StepPlanner.measure(dm, rows=min(8, config.max_batch_size))
        if calibrate and config.schedule == "auto"
        else StepPlanner.fixed("mixed" if config.schedule == "auto" else config.schedule)
    )
    engine = Engine(dm, config, planner=planner)
    name = base_name or os.path.basename(os.path.normpath(os.fspath(base)))
    resolver = ModelResolver(
        base_name=name, base_fingerprint=dm.base_fingerprint, api=resolver_api, allow_paths=allow_paths
    )
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(base))
    return Serving(engine, tokenizer, resolver, ServerConfig(base_name=name, api_key=api_key))
