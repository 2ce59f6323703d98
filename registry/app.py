"""The FastAPI application: `create_app(settings)` wires the database, the blob store, the
routers, error bodies and metrics. It refuses to start on a database not at the schema head.

    uvicorn --factory registry.app:create_app
"""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from codec import __version__

from .api import ROUTERS
from .blobstores import open_blob_store
from .db import Database
from .deps import AppState
from .errors import RegistryError
from .metrics import MetricsMiddleware, RegistryMetrics
from .push import PushService
from .schema import check_schema
from .settings import Settings

log = logging.getLogger("deltastore.registry")
_HTTP_CODES = {400: "invalid_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "too_large", 416: "range_not_satisfiable",
               422: "invalid_request"}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message}}, headers=headers)


def _registry_error(request: Request, exc: RegistryError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(exc.status, exc.code, str(exc), headers)


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return error_response(422, "invalid_request", "; ".join(parts))


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail), exc.headers)


def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = RegistryMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        db = Database.from_url(settings.resolved_database_url)
        try:
            check_schema(db.engine)
            store = open_blob_store(settings)
            app.state.registry = AppState(
                settings=settings, db=db, store=store, metrics=metrics,
                pushes=PushService(db=db, store=store, settings=settings, metrics=metrics),
            )
            yield
        finally:
            db.dispose()

    app = FastAPI(
        title="deltastore registry",
        version=__version__,
        summary="Index and storage of 1-bit compressed deltas of fine-tuned LLMs, per base model.",
        lifespan=lifespan,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_exception_handler(RegistryError, _registry_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    for router in ROUTERS:
        app.include_router(router)
    return app
