"""Auth on: every write endpoint against every kind of caller (the token x endpoint matrix)."""

from __future__ import annotations

import pytest

from tests.registry.conftest import BACKENDS
from tests.registry.helpers import BASE_NAME, error_of, push, setup_repo

ADMIN_SECRET = "root-secret-for-tests"
CALLERS = ["none", "read", "other", "write", "admin"]


@pytest.fixture
def authed(make_client, delta_blobs, base_fingerprint):
    """An auth-on registry with acme/math (2 versions), and one token per kind of caller."""
    client = make_client(auth_enabled=True, admin_token=ADMIN_SECRET)
    admin = {"Authorization": f"Bearer {ADMIN_SECRET}"}
    setup_repo(client, base_fingerprint, "acme/math", headers=admin)
    spare = {"name": "acme/spare", "fingerprint": "sha256:" + "34" * 32}
    assert client.post("/v1/bases", json=spare, headers=admin).status_code == 201
    for blob in delta_blobs[:2]:
        assert push(client, blob, headers=admin).status_code == 201
    headers = {"none": {}, "admin": admin}
    for caller, scopes in {
        "read": [{"namespace": "acme", "permission": "read"}],
        "other": [{"namespace": "other", "permission": "write"}],
        "write": [{"namespace": "acme", "permission": "write"}],
    }.items():
        r = client.post("/v1/tokens", json={"name": caller, "scopes": scopes}, headers=admin)
        assert r.status_code == 201, r.text
        headers[caller] = {"Authorization": f"Bearer {r.json()['token']}"}
    return client, headers


def _create_repo(c, h, blobs):
    return c.post("/v1/repos", json={"namespace": "acme", "name": "new", "base": BASE_NAME}, headers=h)


def _push(c, h, blobs):
    return push(c, blobs[2], headers=h)


def _set_tag(c, h, blobs):
    return c.put("/v1/repos/acme/math/tags/prod", json={"version": 1}, headers=h)


def _delete_version(c, h, blobs):
    return c.delete("/v1/repos/acme/math/versions/1", headers=h)


def _delete_repo(c, h, blobs):
    return c.delete("/v1/repos/acme/math", headers=h)


def _register_base(c, h, blobs):
    return c.post("/v1/bases", json={"name": "acme/base2", "fingerprint": "sha256:" + "12" * 32}, headers=h)


def _delete_base(c, h, blobs):
    return c.delete("/v1/bases/acme/spare", headers=h)


def _create_token(c, h, blobs):
    return c.post(
        "/v1/tokens", json={"name": "t", "scopes": [{"namespace": "acme", "permission": "read"}]}, headers=h
    )


def _gc(c, h, blobs):
    return c.post("/v1/admin/gc", headers=h)


# endpoint -> the callers allowed (everyone else: 401 without a token, 403 with one)
MATRIX = {
    _create_repo: {"write", "admin"},
    _push: {"write", "admin"},
    _set_tag: {"write", "admin"},
    _delete_version: {"write", "admin"},
    _register_base: {"write", "admin"},
    _delete_repo: {"admin"},
    _delete_base: {"admin"},
    _create_token: {"admin"},
    _gc: {"admin"},
}


def _snapshot(client, admin) -> tuple:
    """Everything a refused write could have changed."""
    get = lambda path: client.get(path, headers=admin).json()  # noqa: E731
    return (
        get("/v1/repos"),
        get("/v1/bases"),
        get("/v1/repos/acme/math/versions"),
        get("/v1/repos/acme/math/tags"),
        len(get("/v1/tokens")),
    )


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
@pytest.mark.parametrize("endpoint", list(MATRIX), ids=lambda f: f.__name__.lstrip("_"))
def test_write_endpoints_obey_the_token_matrix(authed, delta_blobs, endpoint):
    client, headers = authed
    before = _snapshot(client, headers["admin"])
    for caller in CALLERS:
        r = endpoint(client, headers[caller], delta_blobs)
        if caller in MATRIX[endpoint]:
            assert r.status_code < 300, (caller, r.status_code, r.text)
            break  # the first allowed caller changes the state; admin's rights are checked below
        expected = 401 if caller == "none" else 403
        assert r.status_code == expected, (caller, r.status_code, r.text)
        assert error_of(r)["code"] == ("unauthenticated" if expected == 401 else "forbidden")
        if expected == 401:
            assert r.headers["www-authenticate"] == "Bearer"
        assert _snapshot(client, headers["admin"]) == before, f"refused {caller} call changed the registry"


def test_admin_allowed_everywhere(authed, delta_blobs):
    client, headers = authed
    for endpoint in MATRIX:
        if endpoint is not _delete_repo:
            r = endpoint(client, headers["admin"], delta_blobs)
            assert r.status_code < 300, (endpoint.__name__, r.text)


def test_uploads_cannot_be_driven_by_another_namespace(authed, delta_blobs):
    client, headers = authed
    upload = client.post(
        "/v1/repos/acme/math/uploads", json=delta_blobs[3].declaration(), headers=headers["write"]
    ).json()
    for caller, status in (("none", 401), ("read", 403), ("other", 403)):
        assert (
            client.put(upload["upload_url"], content=delta_blobs[3].data, headers=headers[caller]).status_code
            == status
        )
        assert client.post(upload["complete_url"], headers=headers[caller]).status_code == status
        assert client.delete(f"/v1/uploads/{upload['id']}", headers=headers[caller]).status_code == status
    assert (
        client.put(upload["upload_url"], content=delta_blobs[3].data, headers=headers["write"]).status_code
        == 200
    )
    assert client.post(upload["complete_url"], headers=headers["write"]).json()["created_by"] == "token:write"


def test_private_repositories_need_a_read_scope(authed):
    client, headers = authed
    admin = headers["admin"]
    assert (
        client.post(
            "/v1/repos",
            json={"namespace": "acme", "name": "secret", "base": BASE_NAME, "visibility": "private"},
            headers=admin,
        ).status_code
        == 201
    )
    assert client.get("/v1/repos/acme/secret").status_code == 401
    assert client.get("/v1/repos/acme/secret", headers=headers["other"]).status_code == 403
    assert client.get("/v1/repos/acme/secret", headers=headers["read"]).status_code == 200
    listed = lambda who: {
        r["full_name"] for r in client.get("/v1/repos", headers=headers[who]).json()["items"]
    }  # noqa: E731
    assert listed("none") == listed("other") == {"acme/math"}
    assert listed("read") == listed("admin") == {"acme/math", "acme/secret"}
    # public repositories stay readable without a token (anonymous_read)
    assert client.get("/v1/repos/acme/math/versions/latest").status_code == 200


def test_tokens_are_stored_hashed_listed_without_secrets_and_revocable(authed, make_settings):
    client, headers = authed
    admin = headers["admin"]
    secret = headers["write"]["Authorization"].split()[1]
    listing = client.get("/v1/tokens", headers=admin)
    assert listing.status_code == 200 and secret not in listing.text
    from registry.server.db import Database

    db = Database.from_url(make_settings().resolved_database_url)
    with db.engine.connect() as conn:
        dump = str(conn.exec_driver_sql("SELECT * FROM api_tokens").fetchall())
    db.dispose()
    assert secret not in dump
    who = client.get("/v1/whoami", headers=headers["write"]).json()
    assert who == {
        "name": "token:write",
        "authenticated": True,
        "scopes": {"acme": "write"},
        "auth_enabled": True,
    }
    token_id = next(t["id"] for t in listing.json() if t["name"] == "write")
    assert client.delete(f"/v1/tokens/{token_id}", headers=admin).status_code == 204
    r = client.get("/v1/whoami", headers=headers["write"])
    assert r.status_code == 401 and "revoked" in error_of(r)["message"]
    assert client.get("/v1/whoami", headers={"Authorization": "Basic abc"}).status_code == 401


def test_no_anonymous_reads_when_disabled(make_client, base_fingerprint):
    client = make_client(auth_enabled=True, admin_token=ADMIN_SECRET, anonymous_read=False)
    assert client.get("/v1/repos").status_code == 401
    assert client.get("/v1/repos", headers={"Authorization": f"Bearer {ADMIN_SECRET}"}).status_code == 200
    assert client.get("/healthz").status_code == 200
