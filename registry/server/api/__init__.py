"""The `/v1` routers, one per resource, plus health and metrics."""

from registry.server.api import admin, bases, health, repos, tags, tokens, uploads, versions

ROUTERS = (
    bases.router,
    repos.router,
    versions.router,
    tags.router,
    uploads.router,
    tokens.router,
    admin.router,
    health.router,
)
