"""Scale-out of the inference server on Ray Serve: replicas that each own one single-node serving app
(one DeltaModel + Engine) and an OpenAI ingress that routes each request by its delta ref (Ray's
multiplexed model id), so a tenant's requests land on a replica that already holds its delta.

    serve run docs/ray-serve.yaml                         # or: deltactl serve-model BASE --ray --replicas 2
    app = build_app(ServeArgs(base="llama-base/", registry="http://reg:8000", replicas=2))
    serve.run(app)

Nothing here routes by itself: the ingress only names the request's `model` as the multiplexed id;
Ray picks the replica and its `@serve.multiplexed` LRU (as large as the slot pool) decides which
deltas each replica keeps. The replica runs every request through the single-node FastAPI app in
its own process (an in-process ASGI call), so wire format, errors and SSE streaming are the same.
"""

# No `from __future__ import annotations`: Ray's class-based FastAPI view reads the ingress
# method's annotations as objects (string ones make FastAPI take `request` for a query parameter).
import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import metrics as serve_metrics
from ray.serve.exceptions import BackPressureError

from .errors import NotLoadedError

logger = logging.getLogger("ray.serve")

# the pool's and engine's totals each replica exports as a Ray counter: key -> (name, description)
REPLICA_COUNTERS = {
    "loads": ("deltastore_replica_delta_loads", "Deltas read into this replica's slot pool."),
    "steps": ("deltastore_replica_decode_steps", "Decode steps of this replica's engine."),
    "rows": ("deltastore_replica_decode_rows", "Sequences decoded, summed over the steps."),
    "deltas": (
        "deltastore_replica_decode_step_deltas",
        "Distinct deltas among each decode step's rows, summed over the steps.",
    ),
    "seconds": ("deltastore_replica_decode_seconds", "Seconds spent in decode steps."),
}

REPLICA_HEADER = "x-deltastore-replica"  # the replica's Ray actor name (SERVE_REPLICA::app#deployment#id)
# "hit": the replica held the delta (or was loading it for another request) when the request came;
# "miss": this request had it load the delta.
DELTA_CACHE_HEADER = "x-deltastore-delta-cache"
ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")
# Admin calls are routed by their lora_name: a load or pin lands where Ray then sends the delta's
# requests, an unload or unpin on a replica holding it (the replica loads nothing for those).
LOADING_ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/pin_lora_adapter")
ADMIN_PATHS = (*LOADING_ADMIN_PATHS, "/v1/unload_lora_adapter", "/v1/unpin_lora_adapter")
REPLICA_ATTEMPTS = 3  # tries on replicas that died before answering (a request that never started)


class ServeArgs(BaseModel):
    """The application's arguments: `serve run` reads them from a config file's `args:`, and
    `deltactl serve-model --ray` builds them from its options. Engine and pool options are those of
    the single-node `deltactl serve-model`, per replica."""

    base: str = Field(description="HF model directory of the base (the same path on every node)")
    base_name: str | None = Field(None, description="the base's registry name (default: the directory name)")
    replicas: int = Field(1, ge=1)
    registry: str | None = Field(None, description="registry URL the replicas pull deltas from")
    token: str | None = None
    cache_dir: str | None = Field(None, description="client cache (DELTACTL_HOME) of every replica")
    device: str | None = Field(None, description="cuda or cpu (default: cuda when the replica has a GPU)")
    dtype: str | None = None
    base_fingerprint: str | None = Field(None, description="skips hashing the base in every replica")
    max_slots: int = Field(16, ge=1, description="slot pool size; also Ray's max_num_models_per_replica")
    memory_budget: str = "4GiB"
    max_planes: int = Field(1, ge=1, description="most sign planes a served delta may have")
    max_rank: int = Field(0, ge=0, description="highest low-rank factor rank a served delta may have")
    max_batch_size: int = Field(16, ge=1)
    max_batch_tokens: int = Field(512, ge=1)
    max_queue: int = Field(256, ge=0)
    max_running_per_tenant: int | None = Field(None, ge=1)
    request_timeout: float = 600.0
    schedule: Literal["auto", "mixed", "grouped"] = "auto"
    api_key: str | None = None
    allow_paths: bool = False
    calibrate: bool = True
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="requests a replica takes at once (default: twice max_batch_size); beyond it Ray "
        "sends a delta's requests to another replica, which loads the delta too: hot deltas spread",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads per replica (default: Ray's)")
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float | None = Field(None, description="default: 1 with device=cuda, else 0")
    route_by_model: bool = Field(True, description="False: Ray's default routing, ignoring the delta ref")

    @property
    def resolved_base_name(self) -> str:
        return self.base_name or os.path.basename(os.path.normpath(self.base))

    @property
    def gpus_per_replica(self) -> float:
        if self.num_gpus_per_replica is not None:
            return self.num_gpus_per_replica
        return 1.0 if self.device == "cuda" else 0.0


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress received it; `model` is the body's `model` (None for the base
    or a body without one)."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    model: str | None = None

    def scope(self) -> dict:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": self.query_string,
            "headers": self.headers,
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
        }


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: list[tuple[bytes, bytes]]


async def asgi_stream(app, scope: dict, body: bytes) -> AsyncIterator[ResponseStart | bytes]:
    """Call an ASGI app in this process: yields its ResponseStart, then each body chunk as the app
    sends it (so SSE streams through). Closing the iterator early tells the app the client left."""
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_read = False

    async def receive() -> dict:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await sent.put(message)

    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(None))
    try:
        while True:
            message = await sent.get()
            if message is None:  # the app returned (or raised) without finishing its response
                task.result()
                raise RuntimeError("the app finished without a complete response")
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
    finally:
        gone.set()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, timeout=10)


class HeldDelta:
    """What Ray's multiplexing caches for one delta ref on a replica: the replica's claim on the
    delta, which its engine loads into the slot pool when it admits the ref's first request. Ray
    calls `__del__` when it evicts the ref (its LRU), which frees the slot."""

    def __init__(self, replica: "DeltaReplica", ref: str, path: str) -> None:
        self.replica, self.ref, self.path = replica, ref, path
        self._released = False

    def __del__(self) -> None:
        # Ray calls this on eviction and the garbage collector may call it again: release once.
        if not getattr(self, "_released", True):
            self._released = True
            try:
                self.replica.release(self.ref, self.path)
            except Exception:  # Python drops what __del__ raises: put it in the replica's log
                logger.exception("releasing %s failed", self.ref)


class DeltaReplica:
    """One replica: a single-node serving app (DeltaModel + Engine + resolver) in this process.
    Ray's multiplexed loader `self.load_delta`, sized to the slot pool, records which refs this
    replica holds (what Ray routes by); the engine loads them as it admits their requests."""

    async def __init__(self, args: ServeArgs) -> None:
        self.args = args
        self.serving = await asyncio.to_thread(_build_serving, args)
        self.dm = self.serving.engine.dm
        from .serving.app import create_app

        self.app = create_app(self.serving)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the engine thread
        context = serve.get_replica_context()
        self.name = context.replica_id.to_full_id_str()
        self._holders: dict[str, set[str]] = {}  # delta path -> refs Ray holds for it here
        self._in_flight: dict[str, int] = {}  # delta path -> requests for it running here
        self._seen: dict[str, float] = {}  # counter -> the total already exported

        async def load_delta(ref: str) -> HeldDelta:
            return await self._hold(ref)

        self.load_delta = serve.multiplexed(max_num_models_per_replica=self.dm.pool.num_slots)(load_delta)
        self.requests_metric = serve_metrics.Counter(
            "deltastore_replica_delta_requests",
            description="Delta requests: hit (the replica held or was loading the delta) or miss.",
            tag_keys=("outcome",),
        )
        self.total_metrics = {
            key: serve_metrics.Counter(name, description)
            for key, (name, description) in REPLICA_COUNTERS.items()
        }
        self.resident_metric = serve_metrics.Gauge(
            "deltastore_replica_resident_deltas", description="Deltas resident in this replica's slot pool."
        )
        self.delta_metric = serve_metrics.Gauge(
            "deltastore_replica_delta_resident",
            description="1 while the delta ref is held by this replica (Ray's multiplexed cache), else 0.",
            tag_keys=("delta",),
        )
        self._update_metrics()

    async def _hold(self, ref: str) -> HeldDelta:
        """Ray's loader: no read here. Ray runs one loader at a time per replica (its model cache
        lock), so a load awaited here would stall every other new ref behind a full pool whose
        slots running sequences lease; the engine instead starts the load when a slot can be had
        and keeps decoding meanwhile (its admission), like any single-node request."""
        resolved = await asyncio.to_thread(self.serving.resolver.resolve, ref)  # cached by now
        if resolved.path is None:
            raise ValueError(f"{ref!r} is the base model, not a delta")
        path = str(resolved.path)
        self._holders.setdefault(path, set()).add(ref)
        self.delta_metric.set(1, tags={"delta": ref})
        return HeldDelta(self, ref, path)

    def release(self, ref: str, path: str) -> None:
        """Ray evicted `ref`: free its slot unless another cached ref needs the same file, an admin
        pinned it, or requests for it still run or wait here. Ray's LRU goes by when a ref was last
        routed here, so it can drop a delta whose sequences still decode; unloading it then would
        hide it from the pool and make a request already waiting for it load it a second time.
        Such a delta is freed when its last request here ends (`_drop_unheld`)."""
        refs = self._holders.get(path, set())
        refs.discard(ref)
        self.delta_metric.set(0, tags={"delta": ref})
        if not refs:
            self._holders.pop(path, None)
            self._drop_unheld(path)
        self._update_metrics()

    def _drop_unheld(self, path: str) -> None:
        """Unload the delta at `path` if Ray holds no ref to it here, no request for it runs or
        waits here, and no admin pinned it."""
        if path in self._holders or self._in_flight.get(path):
            return
        with contextlib.suppress(NotLoadedError, LookupError):
            self.dm.unload(path, keep_pinned=True)

    def _resident(self, path: str) -> bool:
        try:
            self.dm.pool.find(path)
        except (NotLoadedError, LookupError):
            return False
        return True

    async def _delta_path(self, model: str) -> str | None:
        """The local file of a servable delta ref; None for anything the app will refuse."""
        try:
            resolved = await asyncio.to_thread(self.serving.resolver.resolve, model)
        except Exception:
            return None
        return None if resolved.path is None else str(resolved.path)

    async def handle_request(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """Run one HTTP request through the single-node app; yields ResponseStart, then the body."""
        outcome = path = None
        loads = request.path in ROUTED_PATHS or request.path in LOADING_ADMIN_PATHS
        if request.model is not None and loads:
            path = await self._delta_path(request.model)
        if path is not None:
            # A hit: the delta is resident, or another request in flight here is already loading it.
            outcome = "hit" if self._in_flight.get(path) or self._resident(path) else "miss"
            self._in_flight[path] = self._in_flight.get(path, 0) + 1
            self.requests_metric.inc(tags={"outcome": outcome})
        try:
            if path is not None and serve.get_multiplexed_model_id():
                with contextlib.suppress(Exception):  # the app answers the same error in OpenAI's shape
                    await self.load_delta(request.model)
            async for item in asgi_stream(self.app, request.scope(), request.body):
                if isinstance(item, ResponseStart):
                    extra = [(REPLICA_HEADER.encode(), self.name.encode())]
                    if outcome is not None:
                        extra.append((DELTA_CACHE_HEADER.encode(), outcome.encode()))
                    item = ResponseStart(item.status, item.headers + extra)
                yield item
        finally:
            if path is not None:
                self._in_flight[path] -= 1
                if not self._in_flight[path]:
                    del self._in_flight[path]
                    if serve.get_multiplexed_model_id():
                        self._drop_unheld(path)  # Ray dropped its ref while this request ran
            self._update_metrics()

    def _update_metrics(self) -> None:
        stats = self.dm.pool.stats()
        self.resident_metric.set(len(stats["resident"]))
        totals = {"loads": stats.get("loads", 0), **self.serving.engine.decode}
        for key, counter in self.total_metrics.items():
            grown = totals[key] - self._seen.get(key, 0)
            if grown > 0:
                counter.inc(grown)
                self._seen[key] = totals[key]

    def check_health(self) -> None:
        if not self.serving.engine.alive:
            raise RuntimeError("the engine thread is not running")

    async def __del__(self) -> None:
        # Ray calls this on shutdown, also after a constructor that failed half-way.
        lifespan, serving = getattr(self, "_lifespan", None), getattr(self, "serving", None)
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)  # stops the engine
        if serving is not None and serving.resolver.api is not None:
            serving.resolver.api.close()


def _build_serving(args: ServeArgs):
    import torch

    from .serving.app import build_serving
    from .serving.engine import EngineConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    api = None
    if args.registry is not None:
        from registry.client.api import RegistryApi

        api = RegistryApi(args.registry, args.token, home=args.cache_dir)
    return build_serving(
        args.base,
        base_name=args.resolved_base_name,
        device=args.device,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        max_slots=args.max_slots,
        memory_budget=args.memory_budget,
        max_planes=args.max_planes,
        max_rank=args.max_rank,
        engine_config=EngineConfig(
            max_batch_size=args.max_batch_size,
            max_batch_tokens=args.max_batch_tokens,
            max_queue=args.max_queue,
            max_running_per_tenant=args.max_running_per_tenant,
            request_timeout=args.request_timeout,
            schedule=args.schedule,
        ),
        registry_api=api,
        api_key=args.api_key,
        allow_paths=args.allow_paths,
        calibrate=args.calibrate,
        base_fingerprint=args.base_fingerprint,
    )


# ---------------------------------------------------------------------------------------------
# the ingress
# ---------------------------------------------------------------------------------------------
ingress_app = FastAPI(
    title="deltastore inference server (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None
)


def _error(status: int, message: str, *, type: str, code: str, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "code": code, "param": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def _sse_error(message: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": "service_unavailable", "code": code}}
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\ndata: [DONE]\n\n".encode()


def routing_model(path: str, body: bytes, base_name: str) -> str | None:
    """The delta ref a request is for (its multiplexed model id), or None: base, admin calls that
    name no delta, or a body the app will refuse anyway."""
    if path not in ROUTED_PATHS and path not in ADMIN_PATHS:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    model = doc.get("model" if path in ROUTED_PATHS else "lora_name") if isinstance(doc, dict) else None
    if not isinstance(model, str) or not model or model == base_name:
        return None
    return model


@serve.ingress(ingress_app)
class Ingress:
    """The HTTP front: forwards every request to a replica, naming the body's delta ref as Ray's
    multiplexed model id so Ray routes it to a replica that holds the delta."""

    def __init__(self, replicas, args: ServeArgs) -> None:
        self.replicas = replicas
        self.base_name = args.resolved_base_name
        self.route_by_model = args.route_by_model

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def forward(self, request: Request) -> Response:
        body = await request.body()
        path = "/" + request.path_params["path"]  # below the application's route prefix
        model = routing_model(path, body, self.base_name)
        forwarded = ForwardedRequest(
            method=request.method,
            path=path,
            query_string=request.url.query.encode(),
            headers=[(k.lower(), v) for k, v in request.headers.raw if k.lower() != b"host"],
            body=body,
            model=model,
        )
        handle = self.replicas.options(stream=True)
        if model is not None and self.route_by_model:
            handle = self.replicas.options(stream=True, multiplexed_model_id=model)
        for attempt in range(REPLICA_ATTEMPTS):
            stream = handle.handle_request.remote(forwarded)
            try:
                start = await self._first(stream, request)
                break
            except RayActorError as exc:  # the replica died before answering: nothing was generated for
                last = exc  # the client yet, so another replica can take the request
                await asyncio.sleep(0.2 * (attempt + 1))
            except BackPressureError as exc:  # max_queue requests already wait for a replica
                num_queued, max_queued = exc.args[:2]
                return _error(
                    429,
                    f"the wait queue is full ({num_queued} of {max_queued} requests waiting for a "
                    "replica); retry later",
                    type="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                )
            except asyncio.CancelledError:
                stream.cancel()
                return Response(status_code=499)
            except Exception as exc:  # the replica raised outside the app (a defect): still OpenAI's shape
                return _error(
                    500,
                    f"internal error in the serving replica: {type(exc).__name__}: {exc}",
                    type="server_error",
                    code="internal_error",
                )
        else:
            return _error(
                503,
                f"no serving replica could take the request ({REPLICA_ATTEMPTS} tries, last: "
                f"{type(last).__name__})",
                type="service_unavailable",
                code="replica_unavailable",
                headers={"Retry-After": "1"},
            )
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in start.headers
            if k.lower() not in (b"content-length", b"transfer-encoding")
        }
        sse = headers.get("content-type", "").startswith("text/event-stream")
        return StreamingResponse(self._body(stream, sse), status_code=start.status, headers=headers)

    @staticmethod
    async def _first(stream, request: Request) -> ResponseStart:
        """The replica's ResponseStart; cancels the replica's work if the client leaves meanwhile."""
        first = asyncio.ensure_future(stream.__anext__())
        while True:
            done, _ = await asyncio.wait({first}, timeout=0.5)
            if done:
                return first.result()
            if await request.is_disconnected():
                first.cancel()
                stream.cancel()
                raise asyncio.CancelledError

    @staticmethod
    async def _body(stream, sse: bool) -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield chunk
        except RayActorError as exc:
            # The replica died mid-response: a stream ends with an error event in OpenAI's shape.
            if sse:
                yield _sse_error(
                    f"the serving replica failed mid-response: {type(exc).__name__}", "replica_failed"
                )
        finally:
            stream.cancel()  # no-op once finished; frees the replica's KV and lease if the client left


def build_app(args: ServeArgs | dict[str, Any]) -> serve.Application:
    """The Serve application: `args.replicas` DeltaReplica deployments behind the Ingress. This is
    the `import_path` of a Serve config file (`gpu_loader.ray_serve:build_app`)."""
    args = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    per_replica = args.max_ongoing_requests or 2 * args.max_batch_size
    replica = serve.deployment(
        DeltaReplica,
        name="DeltaReplica",
        num_replicas=args.replicas,
        max_ongoing_requests=per_replica,  # a full replica makes Ray try another one
        max_queued_requests=args.max_queue,  # per ingress replica; beyond it: 429 like the engine's queue
        ray_actor_options={"num_cpus": args.num_cpus_per_replica, "num_gpus": args.gpus_per_replica},
        health_check_period_s=5,
        max_constructor_retry_count=2,  # a base that cannot load fails the deployment, not 20 retries
    )
    ingress = serve.deployment(
        Ingress,
        name="Ingress",
        max_ongoing_requests=per_replica * args.replicas + 64,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(replica.bind(args), args)
