"""Liveness, readiness (database at the schema head, blob store reachable) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from registry.common.errors import RegistryError
from registry.server.deps import StateDep
from registry.server.migrate import check_schema
from registry.server.schemas import NotReadyBody, ReadyOut

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz", response_model=ReadyOut, responses={503: {"model": NotReadyBody, "description": "Not ready"}}
)
async def readyz(state: StateDep):
    checks: dict[str, str] = {}
    failure: RegistryError | None = None

    def probe(name: str, fn) -> None:
        nonlocal failure
        try:
            fn()
            checks[name] = "ok"
        except Exception as exc:  # readiness reports any failure instead of raising it
            checks[name] = f"error: {exc}"
            failure = failure or (exc if isinstance(exc, RegistryError) else RegistryError(str(exc)))

    await run_in_threadpool(probe, "database", lambda: (state.db.ping(), check_schema(state.db.engine)))
    await run_in_threadpool(probe, "blob_store", state.store.check)
    if failure is not None:
        return JSONResponse(
            status_code=503,
            content={
                "error": {
                    "code": "not_ready",
                    "message": "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok"),
                },
                "checks": checks,
            },
        )
    return {"status": "ready", "checks": checks}


@router.get("/metrics", include_in_schema=False)
def metrics(state: StateDep) -> Response:
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)
