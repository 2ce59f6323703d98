"""Content negotiation: browsers get HTML error pages outside /v1, API clients keep the JSON
error bodies; /docs and /redoc load only this server's files; the OpenAPI document is the API's."""

from __future__ import annotations

import re

import pytest

from .conftest import BROWSER

JSON_CLIENTS = [
    {},
    {"Accept": "*/*"},
    {"Accept": "application/json"},
    {"Accept": "application/json, text/html;q=0.5"},
]


@pytest.mark.parametrize("path", ["/nothing/here/at/all", "/nope", "/-/static/missing.css"])
def test_unknown_path_is_an_html_404_for_browsers(client, path):
    r = client.get(path, headers=BROWSER)
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert "Not found" in r.text and "<h1>" in r.text


@pytest.mark.parametrize("headers", JSON_CLIENTS)
def test_unknown_path_stays_json_for_api_clients(client, headers):
    r = client.get("/nothing/here/at/all", headers=headers)
    assert r.status_code == 404
    assert r.json() == {"error": {"code": "not_found", "message": "Not Found"}}


@pytest.mark.parametrize(
    "path", ["/v1/nope", "/v1/repos/acme/none", "/v1/bases/org/none", "/v1/repos/acme/none/versions/1"]
)
def test_api_paths_answer_json_even_to_browsers(client, path):
    r = client.get(path, headers=BROWSER)
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "not_found"


def test_an_unknown_api_path_keeps_its_plain_404(client):
    """/v1/x has the shape of a repository page; it still answers what it answered before the pages."""
    for headers in (BROWSER, {}):
        r = client.get("/v1/whatever", headers=headers)
        assert r.status_code == 404 and r.json() == {"error": {"code": "not_found", "message": "Not Found"}}


def test_missing_repository_page_negotiates(client):
    html = client.get("/acme/none", headers=BROWSER)
    assert html.status_code == 404 and "repository acme/none does not exist" in html.text
    assert html.headers["content-type"].startswith("text/html")
    api = client.get("/acme/none")
    assert api.status_code == 404 and api.json() == {
        "error": {"code": "not_found", "message": "repository acme/none does not exist"}
    }


def test_invalid_name_is_a_400_page(client):
    r = client.get("/Acme/Math", headers=BROWSER)
    assert r.status_code == 400 and "invalid namespace &#39;Acme&#39;" in r.text


def test_pages_forbid_off_site_content(client):
    r = client.get("/", headers=BROWSER)
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    for url in re.findall(r'(?:href|src|action)="([^"]+)"', r.text):
        assert url.startswith("/") or url.startswith("?"), url


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_load_only_local_assets(client, path):
    r = client.get(path)
    assert r.status_code == 200
    assets = re.findall(r'(?:href|src)="([^"]+)"', r.text)
    assert assets and all(a.startswith("/-/") for a in assets), assets
    assert "cdn" not in r.text.lower() and "fonts.googleapis" not in r.text
    for asset in assets:
        got = client.get(asset)
        assert got.status_code == 200 and len(got.content) > 100, asset
    if path == "/docs":
        assert '"validatorUrl": null' in r.text  # no badge from validator.swagger.io
        assert (
            client.get("/-/swagger/swagger-ui-bundle.js")
            .headers["content-type"]
            .startswith(("text/javascript", "application/javascript"))
        )


def test_openapi_document_holds_only_the_api(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert all(p.startswith("/v1/") or p in ("/healthz", "/readyz") for p in paths), sorted(paths)


def test_a_page_path_names_its_methods(client):
    r = client.post("/acme/math")
    assert (r.status_code, r.headers["allow"]) == (405, "GET")
    assert r.json()["error"]["code"] == "method_not_allowed"
    page = client.post("/acme/math", headers=BROWSER)
    assert page.status_code == 405 and "Method not allowed" in page.text


def test_invalid_query_is_a_page_for_browsers_and_json_for_clients(client):
    too_long = "x" * 65
    page = client.get(f"/search?q={too_long}", headers=BROWSER)
    assert page.status_code == 422 and "Bad request" in page.text and "at most 64 characters" in page.text
    api = client.get(f"/search?q={too_long}")
    assert api.status_code == 422 and api.json()["error"]["code"] == "invalid_request"
    assert client.get(f"/v1/repos?q={too_long}", headers=BROWSER).json()["error"]["code"] == "invalid_request"
