"""Base models: a base registered by mistake can be removed, but never from under a repository."""

from __future__ import annotations

import pytest

from tests.registry.conftest import BACKENDS
from tests.registry.helpers import BASE_NAME, error_of, setup_repo

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
WRONG = "sha256:" + "ab" * 32


def test_a_base_in_use_is_not_removed(client):
    setup_repo(client, WRONG, "acme/math")
    setup_repo(client, WRONG, "acme/code")
    r = client.delete(f"/v1/bases/{BASE_NAME}")
    assert r.status_code == 409
    assert error_of(r) == {
        "code": "conflict",
        "message": (
            f"base model {BASE_NAME!r} is used by 2 repositories; delete them first "
            f"(GET /v1/bases/{BASE_NAME}/repos lists them)"
        ),
    }
    assert client.get(f"/v1/bases/{BASE_NAME}").json()["fingerprint"] == WRONG
    assert client.delete("/v1/repos/acme/code").status_code == 204
    r = client.delete(f"/v1/bases/{BASE_NAME}")
    assert r.status_code == 409 and "is used by 1 repository; delete it first" in error_of(r)["message"]


def test_a_wrongly_registered_base_is_removed_and_registered_again(client, base_fingerprint):
    setup_repo(client, WRONG, "acme/math")
    assert client.delete("/v1/repos/acme/math").status_code == 204
    assert client.delete(f"/v1/bases/{BASE_NAME}").status_code == 204
    r = client.get(f"/v1/bases/{BASE_NAME}")
    assert r.status_code == 404 and error_of(r)["message"] == f"base model {BASE_NAME!r} is not registered"
    assert client.get("/v1/bases").json()["items"] == []
    # the right fingerprint can be registered now (before, the name was taken for good)
    r = client.post("/v1/bases", json={"name": BASE_NAME, "fingerprint": base_fingerprint})
    assert r.status_code == 201 and r.json()["fingerprint"] == base_fingerprint
    events = client.get("/v1/audit", params={"target": BASE_NAME}).json()["items"]
    assert [(e["action"], e["detail"]) for e in events] == [
        ("create_base", {"fingerprint": base_fingerprint}),
        ("delete_base", {"fingerprint": WRONG}),
        ("create_base", {"fingerprint": WRONG}),
    ]


def test_removing_an_unknown_base_is_not_found(client):
    r = client.delete("/v1/bases/org/never-registered")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
