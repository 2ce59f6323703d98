"""Who is looking at a page: the same bearer token as the API, from the `Authorization` header
or from the HttpOnly cookie the login form sets; and the CSRF token every form carries."""

from __future__ import annotations

import hmac
import secrets

from fastapi import Request
from starlette.responses import Response

from registry.server.auth import LOCAL_USER, Principal, authenticate
from registry.server.deps import AppState

TOKEN_COOKIE = "deltastore_token"
CSRF_COOKIE = "deltastore_csrf"
CSRF_FIELD = "csrf_token"


def page_principal(request: Request, state: AppState) -> Principal:
    """The caller of a page, by the API's rules (`authenticate`): the header wins over the cookie.
    A refused token raises AuthenticationError (the page answers 401 with the login form)."""
    if not state.settings.auth_enabled:
        return LOCAL_USER
    authorization = request.headers.get("authorization")
    if authorization is None and (token := request.cookies.get(TOKEN_COOKIE)):
        authorization = f"Bearer {token}"
    with state.db.read() as session:
        return authenticate(session, state.settings, authorization)


def logged_in_by_cookie(request: Request) -> bool:
    return "authorization" not in request.headers and bool(request.cookies.get(TOKEN_COOKIE))


def csrf_token(request: Request) -> tuple[str, bool]:
    """The CSRF token of this browser (double-submit cookie) and whether it is new (to be set)."""
    token = request.cookies.get(CSRF_COOKIE)
    if token and len(token) == 43:
        return token, False
    return secrets.token_urlsafe(32), True


def check_csrf(request: Request, submitted: str | None) -> bool:
    """A form post is genuine when its hidden token equals the browser's CSRF cookie (another site
    can neither read nor set it) and, when the browser names an origin, it is this one."""
    cookie = request.cookies.get(CSRF_COOKIE)
    if not cookie or not submitted or not hmac.compare_digest(cookie.encode(), submitted.encode()):
        return False
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.url.netloc}"


def set_cookie(response: Response, request: Request, name: str, value: str, *, samesite: str) -> None:
    response.set_cookie(
        name, value, httponly=True, samesite=samesite, secure=request.url.scheme == "https", path="/"
    )


def set_token_cookie(response: Response, request: Request, token: str) -> None:
    # Lax: following a link from elsewhere to a private page works; every cross-site POST is refused by CSRF.
    set_cookie(response, request, TOKEN_COOKIE, token, samesite="lax")


def clear_token_cookie(response: Response) -> None:
    response.delete_cookie(TOKEN_COOKIE, path="/")


def local_target(target: str | None) -> str:
    """Where to go after logging in: a path on this site only (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
