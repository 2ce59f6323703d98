"""Hostile names, refs and bodies over real HTTP (paths sent byte for byte, no client-side
normalisation): traversal, encoded slashes, NUL, Unicode look-alikes, over-long names and SQL
metacharacters are refused or stored literally; nothing is written outside the data directory or
the bucket prefix; no request makes the server fail."""

from __future__ import annotations

import http.client
import json
import os
import re
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.support.corpus import delta_bytes, storage_form
from tests.support.harness import http_push, setup_repo

from .conftest import BACKENDS

HOSTILE = [
    "..",
    "../..",
    "%2e%2e",
    "%2e%2e%2f%2e%2e",
    "..%2f..%2fetc%2fpasswd",
    "a%2fb",
    "a%5cb",
    "a\\b",
    "%00",
    "a%00b",
    "%2fetc%2fpasswd",
    "~root",
    "acme%20x",
    "%25",
    "%27%3b%20DROP%20TABLE%20repositories%3b--",
    "a'b",
    'a"b',
    "a;b",
    "a%0d%0aX-Injected:%201",
    "*",
    "%3f",
    "a" * 65,
    "a" * 5000,
    # Unicode look-alikes of `acme`: Cyrillic a, fullwidth letters, a zero-width space, a ligature
    quote("аcme"),
    quote("ａｃｍｅ"),
    quote("acme\u200b"),
    quote("ﬁle"),
    quote("ACME"),
    quote("acme\u0301"),
]

#: Every path template of the API with one slot for a hostile segment (others are valid).
TEMPLATES = [
    "GET /v1/repos/{x}/math",
    "GET /v1/repos/acme/{x}",
    "GET /v1/repos/{x}/{x}/versions",
    "GET /v1/repos/acme/math/versions/{x}",
    "GET /v1/repos/acme/math/versions/{x}/download",
    "DELETE /v1/repos/acme/math/versions/{x}",
    "PUT /v1/repos/acme/math/tags/{x}",
    "DELETE /v1/repos/acme/math/tags/{x}",
    "GET /v1/bases/{x}/base",
    "GET /v1/bases/org/{x}/repos",
    "POST /v1/repos/{x}/math/uploads",
    "PUT /v1/uploads/{x}",
    "POST /v1/uploads/{x}/complete",
    "GET /v1/uploads/{x}",
    "DELETE /v1/tokens/{x}",
    "GET /v1/repos?q={x}",
    "GET /v1/repos?namespace={x}",
    "GET /v1/repos?base={x}",
    "GET /v1/repos?cursor={x}",
    "GET /v1/audit?target={x}",
]


def raw_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One request with `path` exactly as given (http.client neither normalises nor re-encodes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body or b"")
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


BLOB_LAYOUT = re.compile(
    r"blobs(/sha256(/[0-9a-f]{2}(/[0-9a-f]{64})?)?|/staging(/[0-9a-f]{32}(\.[0-9a-f]{32})?)?)?"
)


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_hostile_path_segments_are_refused_and_touch_nothing(live_server, make_settings, tmp_path):
    server = live_server()
    with server.client() as c:
        setup_repo(c, "acme/math")
        assert http_push(c, "acme/math", storage_form(delta_bytes(1))).status_code == 201
    data_dir = make_settings().data_dir
    outside = tmp_path.parent
    before_outside = {p for p in os.listdir(outside)}
    before = _tree(data_dir)
    body = json.dumps(
        {
            "version": 1,
            "digest": "sha256:" + "0" * 64,
            "size": 1,
            "raw_digest": "sha256:" + "0" * 64,
            "raw_size": 1,
        }
    ).encode()
    seen = {}
    for template in TEMPLATES:
        method, path = template.split(" ")
        for value in HOSTILE:
            status, payload = raw_request(
                server.port, method, path.replace("{x}", value), body if method != "GET" else None
            )
            seen[(template, value)] = status
            assert status < 500, (template, value, status, payload[:300])
            if "q=" in template or "target=" in template:  # free text: searched literally, finds nothing
                items = json.loads(payload)["items"] if status == 200 else []
                # (SQLite's LIKE ignores ASCII case, so `ACME` finds acme/math there)
                assert status in (200, 400, 422) and all(
                    value.lower() in i.get("full_name", "") for i in items
                ), (template, value)
                continue
            # nothing hostile resolves to an existing resource or creates one
            assert status in (400, 404, 405, 409, 413, 422), (template, value, status, payload[:300])
            if status != 405 and payload:
                assert set(json.loads(payload)) >= {"error"}, payload[:300]
    # the data directory holds only the store's own layout, and nothing appeared beside it
    assert _tree(data_dir) == before
    assert all(BLOB_LAYOUT.fullmatch(p) or p.startswith("registry.db") for p in _tree(data_dir)), _tree(
        data_dir
    )
    assert {p for p in os.listdir(outside)} == before_outside
    assert len(seen) == len(TEMPLATES) * len(HOSTILE)


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_hostile_text_is_stored_literally(client):
    setup_repo(client, "acme/math")
    texts = [
        "'; DROP TABLE repositories; --",
        '" OR 1=1 --',
        "%_\\%",
        "../../etc/passwd",
        "a\u202eb (right-to-left)",
        "\u0430cme (Cyrillic)",
        "emoji \U0001f600",
        "x" * 10_000,
    ]
    for i, text in enumerate(texts):
        r = client.post(
            "/v1/repos", json={"namespace": "acme", "name": f"t{i}", "base": "org/base", "description": text}
        )
        assert r.status_code == 201, r.text
        assert client.get(f"/v1/repos/acme/t{i}").json()["description"] == text
    r = client.post(
        "/v1/repos/acme/math/uploads",
        json=storage_form(delta_bytes(2)).declaration(
            description=texts[0], fidelity={"note": texts[1], "nul\u0000key": "nul\u0000value", "big": 2**70}
        ),
    )
    assert r.status_code == 201, r.text
    # the search treats LIKE metacharacters literally
    for name in ("a_b", "axb", "a%b"[:1] + "pct"):
        client.post("/v1/repos", json={"namespace": "acme", "name": name, "base": "org/base"})
    found = lambda q: {x["name"] for x in client.get("/v1/repos", params={"q": q}).json()["items"]}  # noqa: E731
    assert found("a_b") == {"a_b"} and found("%") == set() and found("_") == {"a_b"}
    assert found("' OR '1'='1") == set()
    # the tables are all still there
    assert client.get("/v1/repos", params={"limit": 500}).status_code == 200
    assert client.get("/v1/bases").json()["items"][0]["name"] == "org/base"


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
@pytest.mark.parametrize(
    "field, value, code",
    [
        ("description", "a\u0000b", 422),  # PostgreSQL text cannot hold NUL: refused up front, not a 500
        ("fidelity", {"kl": float("nan")}, 422),  # JSON has no NaN: it would be stored and then unservable
        ("fidelity", {"kl": float("inf")}, 422),
        ("fidelity", json.loads('{"k": "\\ud800"}'), 422),  # a lone surrogate neither driver can encode
        ("size", True, 422),
        ("size", "12", 422),
        ("size", 2**70, 422),
    ],
)
def test_bodies_that_could_not_be_stored_are_refused(client, field, value, code):
    setup_repo(client, "acme/math")
    declaration = storage_form(delta_bytes(3)).declaration(**{field: value})
    raw = json.dumps(declaration, allow_nan=True).encode()
    r = client.post("/v1/repos/acme/math/uploads", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == code, r.text
    assert client.get("/v1/repos/acme/math/versions").json()["items"] == []


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_numbers_out_of_range_are_client_errors(client):
    setup_repo(client, "acme/math")
    assert http_push(client, "acme/math", storage_form(delta_bytes(4))).status_code == 201
    cases = [
        ("DELETE", f"/v1/tokens/{2**70}"),
        ("DELETE", "/v1/tokens/0"),
        ("GET", f"/v1/repos/acme/math/versions/{2**31}"),
        ("GET", "/v1/repos/acme/math/versions/0"),
        ("GET", "/v1/repos/acme/math/versions/007"),
        (
            "GET",
            "/v1/repos/acme/math/versions/\u0663",
        ),  # an Arabic-Indic digit three, which str.isdigit() accepts
        ("GET", "/v1/repos?cursor=" + "OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5"),
        ("GET", "/v1/bases?cursor=" + "W1tbW1tbW1s"),
    ]
    for method, path in cases:
        r = client.request(method, path)
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
    r = client.put("/v1/repos/acme/math/tags/prod", json={"version": 2**40})
    assert r.status_code == 422
    r = client.post(
        "/v1/bases", json={"name": "org/b2", "fingerprint": "sha256:" + "1" * 64, "parameter_count": 2**64}
    )
    assert r.status_code == 422
    # a token listing a namespace twice gets the higher permission, not a database error
    r = client.post(
        "/v1/tokens",
        json={
            "name": "t",
            "scopes": [
                {"namespace": "acme", "permission": "read"},
                {"namespace": "acme", "permission": "write"},
            ],
        },
    )
    assert r.status_code == 201 and r.json()["scopes"] == [{"namespace": "acme", "permission": "write"}]


def test_json_bodies_are_limited_before_they_are_read(make_client):
    client = make_client(max_json_bytes=4096)
    r = client.post(
        "/v1/repos", content=b"{" + b" " * 10_000 + b"}", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"namespace": "acme", "name": "x", "base": "org/base", "description": "'
        for _ in range(100):
            yield b"y" * 100
        yield b'"}'

    r = client.post("/v1/repos", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    r = client.post(
        "/v1/repos", content=b"[" * 3000 + b"]" * 3000, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413


def test_deeply_nested_json_is_refused_cleanly(client):
    setup_repo(client, "acme/math")
    nested = "[" * 900 + "]" * 900
    body = (
        '{"digest": "sha256:'
        + "0" * 64
        + '", "size": 1, "raw_digest": "sha256:'
        + "0" * 64
        + '", "raw_size": 1, "fidelity": {"a": '
        + nested
        + "}}"
    )
    r = client.post(
        "/v1/repos/acme/math/uploads", content=body.encode(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code in (400, 422), r.text


def test_s3_keys_stay_under_the_prefix(make_client, s3_endpoint, s3_bucket, s3_client):
    client = make_client(blob_url=f"s3://{s3_bucket}/tenant/deltas", s3_endpoint_url=s3_endpoint)
    setup_repo(client, "acme/math")
    for i in range(3):
        blob = storage_form(delta_bytes(10 + i))
        r = client.post("/v1/repos/acme/math/uploads", json=blob.declaration(description="../../" * 10))
        upload = r.json()
        from tests.support.harness import send_bytes

        assert send_bytes(client, upload, blob.data) is None
        assert client.post(upload["complete_url"]).status_code == 201
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert keys and all(
        re.fullmatch(
            r"tenant/deltas/(blobs/sha256/[0-9a-f]{64}|blobs/uploads/[0-9a-f]{32}|uploads/[0-9a-f]{32})", k
        )
        for k in keys
    ), keys
    # a hostile digest never reaches the store as a key
    r = client.post(
        "/v1/repos/acme/math/uploads",
        json={"digest": "sha256:../../../x", "size": 1, "raw_digest": "sha256:" + "0" * 64, "raw_size": 1},
    )
    assert r.status_code == 422
