"""Fixtures of the page tests: the real app (TestClient) holding the browsing catalog, asked for
pages the way a browser asks (Accept: text/html)."""

from __future__ import annotations

import re

import pytest

from .catalog import fill_catalog

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
ADMIN_SECRET = "dst_web-admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}


def text_of(html: str) -> str:
    """The visible text of a page, roughly: tags dropped, whitespace collapsed (entities kept)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()


@pytest.fixture
def catalog_client(make_client):
    client = make_client()
    fill_catalog(client)
    return client


@pytest.fixture
def auth_client(make_client):
    """Auth on, anonymous reads of public repositories allowed; filled by the admin."""
    client = make_client(auth_enabled=True, admin_token=ADMIN_SECRET)
    fill_catalog(client, headers=ADMIN)
    return client


def make_token(client, *scopes: tuple[str, str]) -> str:
    r = client.post(
        "/v1/tokens",
        json={"name": "web", "scopes": [{"namespace": ns, "permission": p} for ns, p in scopes]},
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    return r.json()["token"]
