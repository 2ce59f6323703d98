"""The browsable pages: bases, a base's repositories, a repository and one version, search, the
login form, a download that honours the login cookie, and the offline API docs (/docs, /redoc).
Data come through `crud` and `api.views`, so a page shows exactly what the API would let the caller read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import fastapi_offline
from fastapi import APIRouter, Form, Query, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, RedirectResponse, Response

from codec import codecs
from registry.common import names
from registry.common.errors import AuthenticationError, RegistryError
from registry.server import crud
from registry.server.api import versions as versions_api
from registry.server.api.views import repos_out, require_read, versions_out, visible_namespaces
from registry.server.auth import authenticate
from registry.server.deps import Cursor, RepoName, StateDep
from registry.server.web import present, queries
from registry.server.web.chart import build_chart
from registry.server.web.render import render
from registry.server.web.session import (
    CSRF_FIELD,
    check_csrf,
    clear_token_cookie,
    local_target,
    page_principal,
    set_token_cookie,
)
from registry.server.web.tensors import TensorSummaries

router = APIRouter(include_in_schema=False)
STATIC_DIR = Path(__file__).parent / "static"
SWAGGER_DIR = Path(fastapi_offline.__file__).parent / "static"
STATIC_URL, SWAGGER_URL = "/-/static", "/-/swagger"
CHART_VERSIONS = 1000
_summaries = TensorSummaries()
Sort = Annotated[str, Query(max_length=16)]
Search = Annotated[str, Query(max_length=64, pattern=names.TEXT_PATTERN)]


def _page_limit(state) -> int:
    return min(state.settings.page_size, state.settings.max_page_size)


# --- bases -----------------------------------------------------------------------------------
@router.get("/", response_class=HTMLResponse)
def index(request: Request, state: StateDep, cursor: Cursor = None):
    principal = page_principal(request, state)
    with state.db.read() as session:
        namespaces = visible_namespaces(principal, state.settings)
        bases, next_cursor = crud.list_bases(session, cursor=cursor, limit=_page_limit(state))
        counts = queries.repo_counts_by_base(
            session, base_ids=[b.id for b in bases], visible_namespaces=namespaces
        )
        rows = [{"base": b, "repos": counts.get(b.id, 0)} for b in bases]
    return render(
        request,
        "index.html",
        {"rows": rows, "next_cursor": next_cursor, "first_page": not cursor},
        principal=principal,
    )


@router.get("/search", response_class=HTMLResponse)
def search(request: Request, state: StateDep, q: Search = "", cursor: Cursor = None):
    principal = page_principal(request, state)
    query = q.strip()
    with state.db.read() as session:
        rows, next_cursor = crud.list_repos(
            session,
            query=query or None,
            cursor=cursor,
            limit=_page_limit(state),
            visible_namespaces=visible_namespaces(principal, state.settings),
        )
        repos = repos_out(session, rows)
        tags = _tags_of(session, rows)
    return render(
        request,
        "search.html",
        {"q": query, "repos": repos, "tags": tags, "next_cursor": next_cursor},
        principal=principal,
    )


@router.get("/bases/{org}/{model}", response_class=HTMLResponse)
def base_page(
    request: Request,
    org: str,
    model: str,
    state: StateDep,
    sort: Sort = queries.REPO_SORTS[0],
    cursor: Cursor = None,
):
    principal = page_principal(request, state)
    base_name = names.parse_base_name(f"{org}/{model}")
    with state.db.read() as session:
        namespaces = visible_namespaces(principal, state.settings)
        base = crud.get_base(session, name=base_name)
        rows, next_cursor = queries.list_repos_sorted(
            session,
            base_id=base.id,
            visible_namespaces=namespaces,
            sort=sort,
            cursor=cursor,
            limit=_page_limit(state),
        )
        total = queries.repo_counts_by_base(session, base_ids=[base.id], visible_namespaces=namespaces).get(
            base.id, 0
        )
        repos = repos_out(session, rows)
        fidelity = _latest_fidelity(session, rows)
        tags = _tags_of(session, rows)
    return render(
        request,
        "base.html",
        {
            "base": base,
            "repos": repos,
            "fidelity": fidelity,
            "tags": tags,
            "sort": sort,
            "sorts": queries.REPO_SORTS,
            "next_cursor": next_cursor,
            "first_page": not cursor,
            "total": total,
        },
        principal=principal,
    )


def _latest_fidelity(session, repos) -> dict[str, dict | None]:
    latest = crud.latest_versions(session, repo_ids=[r.id for r in repos])
    return {r.full_name: latest[r.id].fidelity if r.id in latest else None for r in repos}


def _tags_of(session, repos) -> dict[str, list[tuple[str, int]]]:
    by_id = queries.tags_by_repo(session, repo_ids=[r.id for r in repos])
    return {r.full_name: by_id.get(r.id, []) for r in repos}


# --- repositories and versions ---------------------------------------------------------------
@router.get("/{namespace}/{name}", response_class=HTMLResponse)
def repo_or_version_page(request: Request, namespace: str, name: str, state: StateDep, cursor: Cursor = None):
    if namespace == "v1":  # the API's namespace of paths: an unknown API path stays the API's plain 404
        raise StarletteHTTPException(404)
    name, at, ref = name.partition("@")
    repo_name = RepoName(
        names.check_segment(namespace, what="namespace"), names.check_segment(name, what="repository name")
    )
    principal = page_principal(request, state)
    if at:
        return _version_page(request, state, principal, repo_name, names.parse_version_ref(ref))
    with state.db.read() as session:
        repo = crud.get_repo(session, namespace=repo_name.namespace, name=repo_name.name)
        require_read(principal, state.settings, repo)
        info = repos_out(session, [repo])[0]
        rows, next_cursor = crud.list_versions(session, repo=repo, cursor=cursor, limit=_page_limit(state))
        versions = versions_out(session, rows)
        total = queries.count_versions(session, repo=repo)
        tags = [(t.name, t.version.number) for t in crud.list_tags(session, repo=repo)]
        chart = build_chart(queries.version_series(session, repo=repo, limit=CHART_VERSIONS), total=total)
    return render(
        request,
        "repo.html",
        {
            "repo": info,
            "versions": versions,
            "tags": tags,
            "total": total,
            "chart": chart,
            "next_cursor": next_cursor,
            "first_page": not cursor,
            "registry_url": _registry_url(request),
            "codec_line": present.codec_line,
        },
        principal=principal,
    )


def _version_page(request: Request, state, principal, repo_name: RepoName, ref: int | str):
    with state.db.read() as session:
        repo = crud.get_repo(session, namespace=repo_name.namespace, name=repo_name.name)
        require_read(principal, state.settings, repo)
        info = repos_out(session, [repo])[0]
        version = crud.get_version(session, repo=repo, ref=ref)
        out = versions_out(session, [version])[0]
        base = repo.base_model
        blob = version.blob
    try:
        tensors, tensors_error = _summaries.get(state.store, blob), None
    except (RegistryError, OSError) as exc:  # the page still shows the index's record when the store fails
        tensors, tensors_error = None, str(exc) or type(exc).__name__
    metadata = dict(out.metadata or {})
    hf_config = metadata.pop("x-hf-config", None)
    sections = []
    for key in ("calibration", *codecs.json_metadata_keys(), "x-fallbacks", "fidelity"):
        if key in metadata:
            sections.append((key, present.rows(present.parse_json(metadata.pop(key)))))
    if out.fidelity and not any(key == "fidelity" for key, _ in sections):
        sections.append(("fidelity", present.rows(out.fidelity)))
    return render(
        request,
        "version.html",
        {
            "repo": info,
            "v": out,
            "base": base,
            "sections": sections,
            "metadata": sorted(metadata.items()),
            "hf_config": present.rows(present.parse_json(hf_config)) if hf_config else None,
            "tensors": tensors,
            "tensors_error": tensors_error,
            "codec_line": present.codec_line,
            "registry_url": _registry_url(request),
            "download": f"/-/download/{repo_name.namespace}/{repo_name.name}/{out.number}",
        },
        principal=principal,
    )


@router.get("/-/download/{namespace}/{name}/{number}")
def download(request: Request, namespace: str, name: str, number: str, state: StateDep):
    """The API's download (same headers, Range, redirect to S3), for a browser logged in by cookie."""
    repo_name = RepoName(
        names.check_segment(namespace, what="namespace"), names.check_segment(name, what="repository name")
    )
    ref = names.parse_version_ref(number)
    principal = page_principal(request, state)
    with state.db.read() as session:
        return versions_api.download_version(
            repo_name, ref, session, principal, state, if_none_match=request.headers.get("if-none-match")
        )


def _registry_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


# --- login -----------------------------------------------------------------------------------
@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, state: StateDep, next: str = "/"):
    return render(request, "login.html", {"next": local_target(next), "error": None})


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    state: StateDep,
    token: Annotated[str, Form(max_length=512)] = "",
    next: Annotated[str, Form(max_length=2048)] = "/",
    csrf_token: Annotated[str | None, Form(alias=CSRF_FIELD, max_length=64)] = None,
):
    target = local_target(next)
    if not check_csrf(request, csrf_token):
        return render(
            request,
            "login.html",
            {"next": target, "error": "the form expired or came from another site; please try again"},
            status=403,
        )
    if not state.settings.auth_enabled:
        return RedirectResponse(target, status_code=303)
    token = token.strip()
    try:
        if not token:
            raise AuthenticationError("enter a token")
        with state.db.read() as session:
            authenticate(session, state.settings, f"Bearer {token}")
    except AuthenticationError as exc:
        return render(request, "login.html", {"next": target, "error": str(exc)}, status=401)
    response = RedirectResponse(target, status_code=303)
    set_token_cookie(response, request, token)
    return response


@router.post("/logout")
def logout(request: Request, csrf_token: Annotated[str | None, Form(alias=CSRF_FIELD, max_length=64)] = None):
    if not check_csrf(request, csrf_token):
        return render(
            request,
            "error.html",
            {"status": 403, "title": "Not allowed", "message": "the form expired or came from another site"},
            status=403,
        )
    response = RedirectResponse("/", status_code=303)
    clear_token_cookie(response)
    return response


# --- API docs, offline -----------------------------------------------------------------------
@router.get("/docs", response_class=HTMLResponse)
def swagger_ui(request: Request) -> Response:
    app = request.app
    return get_swagger_ui_html(
        openapi_url=app.openapi_url,
        title=f"{app.title} – API",
        swagger_js_url=f"{SWAGGER_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{SWAGGER_URL}/swagger-ui.css",
        swagger_favicon_url=f"{STATIC_URL}/favicon.svg",
        swagger_ui_parameters={"validatorUrl": None},  # the default badge asks validator.swagger.io
    )


@router.get("/redoc", response_class=HTMLResponse)
def redoc(request: Request) -> Response:
    app = request.app
    return get_redoc_html(
        openapi_url=app.openapi_url,
        title=f"{app.title} – API",
        redoc_js_url=f"{SWAGGER_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{STATIC_URL}/favicon.svg",
        with_google_fonts=False,
    )
