"""Rendering: the Jinja2 environment (autoescaped), the context every page shares, security
headers, and the HTML error page that browsers get instead of the API's JSON error body."""

from __future__ import annotations

from pathlib import Path

from fastapi import Request
from fastapi.templating import Jinja2Templates
from starlette.responses import HTMLResponse

from codec import __version__
from registry.server.auth import Principal
from registry.server.web import present
from registry.server.web.session import (
    CSRF_COOKIE,
    CSRF_FIELD,
    clear_token_cookie,
    csrf_token,
    local_target,
    logged_in_by_cookie,
    set_cookie,
)

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")  # autoescape is on for .html templates
for _name in (
    "human_bytes",
    "short_digest",
    "when",
    "ratio",
    "parameters",
    "fidelity_summary",
    "fidelity_cells",
):
    templates.env.filters[_name] = getattr(present, _name)
templates.env.globals.update(
    FIDELITY_FIGURES=present.FIDELITY_FIGURES, version=__version__, CSRF_FIELD=CSRF_FIELD
)

#: Pages load nothing from anywhere but this server; the inline SVG needs no exception.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
#: Paths that never answer HTML: the API and the operational endpoints.
_MACHINE_PATHS = ("/v1/", "/healthz", "/readyz", "/metrics", "/openapi.json")


def render(
    request: Request, template: str, context: dict, *, status: int = 200, principal: Principal | None = None
) -> HTMLResponse:
    settings = request.app.state.registry.settings if hasattr(request.app.state, "registry") else None
    csrf, new_csrf = csrf_token(request)
    response = templates.TemplateResponse(
        request,
        template,
        {
            "principal": principal,
            "auth_enabled": bool(settings and settings.auth_enabled),
            "cookie_login": logged_in_by_cookie(request),
            "csrf": csrf,
            **context,
        },
        status_code=status,
        headers=SECURITY_HEADERS,
    )
    if new_csrf:
        set_cookie(response, request, CSRF_COOKIE, csrf, samesite="strict")
    return response


def _quality(accept: str, media: str) -> float:
    """The q-value `accept` gives `media` (exact type, then type/*, then */*)."""
    best, specificity = 0.0, -1
    major = media.split("/")[0]
    for part in accept.split(","):
        kind, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        rank = 2 if kind == media else 1 if kind == f"{major}/*" else 0 if kind == "*/*" else -1
        if rank > specificity:
            best, specificity = q, rank
    return best if specificity >= 0 else 0.0


def wants_html(request: Request) -> bool:
    """A browser (its Accept prefers text/html to application/json) asking for a page, not the API."""
    path = request.url.path
    if path.startswith(_MACHINE_PATHS) or path == "/v1":
        return False
    accept = request.headers.get("accept", "")
    html = _quality(accept, "text/html")
    return html > 0 and html > _quality(accept, "application/json")


def html_error(request: Request, status: int, message: str) -> HTMLResponse | None:
    """The error as a page for a browser (401: the login form), or None for API clients."""
    if not wants_html(request):
        return None
    if status == 401:
        response = render(
            request,
            "login.html",
            {
                "error": message,
                "next": local_target(
                    request.url.path + (f"?{request.url.query}" if request.url.query else "")
                ),
            },
            status=401,
        )
        if request.cookies.get("deltastore_token"):
            clear_token_cookie(response)  # the saved token was refused: forget it
        return response
    titles = {
        400: "Bad request",
        403: "Not allowed",
        404: "Not found",
        405: "Method not allowed",
        422: "Bad request",
    }
    return render(
        request,
        "error.html",
        {"status": status, "title": titles.get(status, "Something went wrong"), "message": message},
        status=status,
    )
