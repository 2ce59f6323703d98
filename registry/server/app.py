"""The FastAPI application: `create_app(settings)` wires the database, the blob store, the
routers, error bodies and metrics. It refuses to start on a database not at the schema head.

    uvicorn --factory registry.app:create_app
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from codec import __version__
from registry.common.errors import DatabaseUnavailableError, RegistryError, StorageFullError
from registry.server.api import ROUTERS
from registry.server.blobstores import open_blob_store
from registry.server.db import Database
from registry.server.deps import AppState
from registry.server.metrics import MetricsMiddleware, RegistryMetrics
from registry.server.migrate import check_schema, running_schema_error
from registry.server.schemas import ErrorBody
from registry.server.settings import Settings
from registry.server.uploads import PushService
from registry.server.web import html_error, mount_web, web_router

log = logging.getLogger("deltastore.registry")
_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    416: "range_not_satisfiable",
    422: "invalid_request",
}
#: Every error an API operation can answer, documented with the one error body.
ERROR_RESPONSES = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "Invalid request or name (`invalid_request`, `invalid_name`)",
        401: "No token, or an unknown, revoked or expired one (`unauthenticated`)",
        403: "The token lacks the permission (`forbidden`)",
        404: "No such resource (`not_found`)",
        409: "Conflicts with the current state (`conflict`, `base_mismatch`)",
        413: "Over a size limit (`too_large`)",
        422: "Invalid body or parameters, or an upload that fails verification (`invalid_request`, "
        "`digest_mismatch`, `size_mismatch`, `invalid_delta`)",
        502: "The blob store failed or is unreachable (`blob_store_error`)",
        503: "The database is unavailable or not migrated (`database_unavailable`, `schema_out_of_date`)",
        507: "Storage is full; nothing was stored (`insufficient_storage`)",
    }.items()
}
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
#: A query naming a column or table the database lacks: SQLite's messages, PostgreSQL's
#: undefined_column and undefined_table.
_SCHEMA_MISMATCH = re.compile(r"no such (column|table)\b|table \S+ has no column named\b")
_SCHEMA_SQLSTATES = {"42703", "42P01"}
_UPLOAD_BYTES_PATH = re.compile(r"/v1/uploads/[0-9a-f]{32}")


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"code": code, "message": message}}, headers=headers
    )


def _registry_error(request: Request, exc: RegistryError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    page = html_error(request, exc.status, str(exc))  # a browser outside /v1 gets a page, API clients JSON
    return page or error_response(exc.status, exc.code, str(exc), headers)


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    message = "; ".join(parts)
    return html_error(request, 422, message) or error_response(422, "invalid_request", message)


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = exc.headers
    if exc.status_code == 405:  # Starlette names only the first route's methods; list every one of the path
        headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
    if exc.status_code in (404, 405) and (page := html_error(request, exc.status_code, str(exc.detail))):
        return page
    return error_response(
        exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail), headers
    )


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for router in (*ROUTERS, web_router):  # their routes carry the full path (included without a prefix)
        for route in router.routes:
            if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
                methods |= route.methods
    return sorted(methods)


def _schema_error(request: Request, exc: Exception) -> JSONResponse | None:
    """A query failed on a column or table the database lacks, and the database is not at this
    server's schema revision (it was downgraded, or restored from an older backup, under the
    running server): 503 `schema_out_of_date`, naming the command that fixes it. None otherwise."""
    cause = getattr(exc, "orig", None) or exc
    if getattr(cause, "sqlstate", None) not in _SCHEMA_SQLSTATES and not _SCHEMA_MISMATCH.match(str(cause)):
        return None
    state = getattr(request.app.state, "registry", None)
    try:
        error = running_schema_error(state.db.engine) if state is not None else None
    except Exception:  # the revision cannot be read either: the database is what fails
        return None
    if error is None:
        return None
    log.error("database schema out of date on %s %s: %s", request.method, request.url.path, error)
    return error_response(error.status, error.code, str(error))


def _programming_error(request: Request, exc: Exception) -> JSONResponse:
    return _schema_error(request, exc) or _unexpected_error(request, exc)


def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """The database went away (restart, failover, network) or stayed locked: a 503 the client may
    retry; the pool replaces broken connections (pre-ping), so the server needs no restart."""
    schema = _schema_error(request, exc)
    if schema is not None:
        return schema
    cause = getattr(exc, "orig", None) or exc
    if "disk is full" in str(cause) or getattr(cause, "sqlstate", None) == "53100":
        return error_response(
            StorageFullError.status,
            StorageFullError.code,
            "the registry database is out of disk space; nothing was changed",
        )
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, type(cause).__name__)
    return error_response(
        DatabaseUnavailableError.status,
        DatabaseUnavailableError.code,
        "the registry database is unavailable; retry shortly",
        headers={"Retry-After": "2"},
    )


def _os_error(request: Request, exc: OSError) -> JSONResponse:
    if exc.errno in _DISK_FULL:
        log.error("storage full on %s %s", request.method, request.url.path)
        return error_response(
            StorageFullError.status,
            StorageFullError.code,
            "the registry's storage is full; nothing was stored",
        )
    return _unexpected_error(request, exc)


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
                settings=settings,
                db=db,
                store=store,
                metrics=metrics,
                pushes=PushService(db=db, store=store, settings=settings, metrics=metrics),
            )
            yield
        finally:
            registry = getattr(app.state, "registry", None)
            if registry is not None:
                registry.pushes.close()
            db.dispose()

    app = FastAPI(
        title="deltastore registry",
        version=__version__,
        summary="Index and storage of 1-bit compressed deltas of fine-tuned LLMs, per base model.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,  # served offline by the web pages (no CDN)
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_json_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_exception_handler(RegistryError, _registry_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for db_error in (OperationalError, InterfaceError, PoolTimeoutError):
        app.add_exception_handler(db_error, _database_error)
    app.add_exception_handler(ProgrammingError, _programming_error)
    app.add_exception_handler(OSError, _os_error)
    app.add_exception_handler(Exception, _unexpected_error)
    for router in ROUTERS:
        app.include_router(router, responses=None if "health" in router.tags else ERROR_RESPONSES)
    mount_web(app)  # after the API: /v1 paths match the API's routes first
    _document_limits(app, settings)
    return app


def _document_limits(app: FastAPI, settings: Settings) -> None:
    """The OpenAPI document states this server's configured size limits, so a declaration it
    would refuse with 413 is not described as valid."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            props = schema["components"]["schemas"]["UploadCreate"]["properties"]
            props["size"]["maximum"] = settings.max_upload_bytes
            props["raw_size"]["maximum"] = settings.max_raw_bytes
        return app.openapi_schema

    app.openapi = openapi


class BodyLimitMiddleware:
    """Refuses request bodies above `max_bytes` (413) as they arrive, before they are parsed or
    held in memory; the blob bytes of `PUT /v1/uploads/{id}` are streamed to disk and limited
    by the upload's declared size instead."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (
            scope["method"] == "PUT" and _UPLOAD_BYTES_PATH.fullmatch(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = error_response(
                413, "too_large", f"request body exceeds this registry's limit of {self.max_bytes} bytes"
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise StarletteHTTPException(
                        413, f"request body exceeds this registry's limit of {self.max_bytes} bytes"
                    )
            return message

        await self.app(scope, limited_receive, send)
