"""The registry's web pages, served by the API's own process: server-rendered (Jinja2) views of
bases, repositories, versions, tags and fidelity, the login form, and offline API docs.

    mount_web(app)        # after the /v1 routers: pages, /-/static, /-/swagger, /docs, /redoc
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from registry.server.web.pages import STATIC_DIR, STATIC_URL, SWAGGER_DIR, SWAGGER_URL
from registry.server.web.pages import router as web_router
from registry.server.web.render import html_error, wants_html


def mount_web(app: FastAPI) -> None:
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="web-static")
    app.mount(SWAGGER_URL, StaticFiles(directory=SWAGGER_DIR), name="web-swagger")
    app.include_router(web_router)


__all__ = ["html_error", "mount_web", "wants_html", "web_router"]
