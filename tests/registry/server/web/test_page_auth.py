"""With auth on, a page shows only what the caller may read, by the API's rules; the token comes
as the bearer header or from the HttpOnly cookie of the CSRF-protected login form."""

from __future__ import annotations

import re

from .conftest import ADMIN_SECRET, BROWSER, make_token, text_of


def login_form(client, next_path: str = "/") -> str:
    r = client.get(f"/login?next={next_path}", headers=BROWSER)
    assert r.status_code == 200
    return re.search(r'name="csrf_token" value="([^"]+)"', r.text).group(1)


def log_in(client, token: str, next_path: str = "/"):
    csrf = login_form(client, next_path)
    return client.post(
        "/login",
        data={"token": token, "next": next_path, "csrf_token": csrf},
        headers=BROWSER,
        follow_redirects=False,
    )


def test_anonymous_visitor_sees_public_repositories_only(auth_client):
    base = text_of(auth_client.get("/bases/org/llama-tiny", headers=BROWSER).text)
    assert "acme/math" in base and "lab/secret" not in base
    index = text_of(auth_client.get("/", headers=BROWSER).text)
    assert "org/llama-tiny LlamaForCausalLM 1.1B 1a1a1a1a1a1a 3" in index  # the private one is not counted
    assert "lab/secret" not in auth_client.get("/search?q=secret", headers=BROWSER).text
    r = auth_client.get("/lab/secret", headers=BROWSER)
    assert r.status_code == 401 and "Log in" in r.text and 'name="next" value="/lab/secret"' in r.text
    assert auth_client.get("/-/download/lab/secret/1", headers=BROWSER).status_code == 401


def test_bearer_header_reads_what_the_token_may_read(auth_client):
    reader = {"Authorization": f"Bearer {make_token(auth_client, ('lab', 'read'))}", **BROWSER}
    assert "internal experiments" in auth_client.get("/lab/secret", headers=reader).text
    assert "lab/secret" in auth_client.get("/bases/org/llama-tiny", headers=reader).text
    other = {"Authorization": f"Bearer {make_token(auth_client, ('acme', 'write'))}", **BROWSER}
    r = auth_client.get("/lab/secret", headers=other)
    assert r.status_code == 403 and "no read access to namespace &#39;lab&#39;" in r.text


def test_login_sets_an_httponly_cookie_and_pages_follow_it(auth_client):
    token = make_token(auth_client, ("lab", "read"))
    r = log_in(auth_client, token, "/lab/secret")
    assert r.status_code == 303 and r.headers["location"] == "/lab/secret"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("deltastore_token=") and "HttpOnly" in cookie and "SameSite=lax" in cookie
    page = auth_client.get("/lab/secret", headers=BROWSER)
    assert page.status_code == 200 and "internal experiments" in page.text
    assert "token:web" in page.text and "Log out" in page.text
    download = auth_client.get("/-/download/lab/secret/1", headers=BROWSER)
    assert download.status_code == 200 and download.headers["x-deltastore-version"] == "1"
    # the API itself keeps reading only the header: the cookie is no API credential
    assert auth_client.get("/v1/repos/lab/secret").status_code == 401


def test_logout_needs_the_form_token_and_forgets_the_cookie(auth_client):
    log_in(auth_client, ADMIN_SECRET)
    assert auth_client.post("/logout", data={}, headers=BROWSER).status_code == 403
    assert "lab/secret" in auth_client.get("/search?q=secret", headers=BROWSER).text  # still logged in
    csrf = auth_client.cookies["deltastore_csrf"]
    r = auth_client.post("/logout", data={"csrf_token": csrf}, headers=BROWSER, follow_redirects=False)
    assert r.status_code == 303 and 'deltastore_token=""' in r.headers["set-cookie"]
    auth_client.cookies.delete("deltastore_token")
    assert "lab/secret" not in auth_client.get("/search?q=secret", headers=BROWSER).text


def test_login_without_the_csrf_token_or_from_another_site_is_refused(auth_client):
    r = auth_client.post(
        "/login", data={"token": ADMIN_SECRET, "next": "/"}, headers=BROWSER, follow_redirects=False
    )
    assert r.status_code == 403 and "deltastore_token" not in r.headers.get("set-cookie", "")
    csrf = login_form(auth_client)
    r = auth_client.post(
        "/login",
        data={"token": ADMIN_SECRET, "csrf_token": csrf},
        headers={**BROWSER, "Origin": "https://evil.example"},
        follow_redirects=False,
    )
    assert r.status_code == 403 and "deltastore_token" not in r.headers.get("set-cookie", "")


def test_wrong_token_shows_the_reason_and_sets_nothing(auth_client):
    r = log_in(auth_client, "dst_not-a-token")
    assert r.status_code == 401 and "unknown or revoked token" in r.text
    assert "deltastore_token" not in r.headers.get("set-cookie", "")


def test_login_only_redirects_on_this_site(auth_client):
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        r = log_in(auth_client, ADMIN_SECRET, target)
        assert r.status_code == 303 and r.headers["location"] == "/", target


def test_revoked_cookie_token_is_dropped(auth_client):
    token = make_token(auth_client, ("lab", "read"))
    log_in(auth_client, token)
    token_id = auth_client.get("/v1/tokens", headers={"Authorization": f"Bearer {ADMIN_SECRET}"}).json()[-1][
        "id"
    ]
    auth_client.delete(f"/v1/tokens/{token_id}", headers={"Authorization": f"Bearer {ADMIN_SECRET}"})
    r = auth_client.get("/", headers=BROWSER)
    assert r.status_code == 401 and "unknown or revoked token" in r.text
    assert 'deltastore_token=""' in r.headers["set-cookie"]


def test_registry_without_anonymous_reads_asks_for_login_first(make_client):
    client = make_client(auth_enabled=True, admin_token=ADMIN_SECRET, anonymous_read=False)
    r = client.get("/", headers=BROWSER)
    assert r.status_code == 401 and "needs a token to read" in r.text and 'action="/login"' in r.text
    assert client.get("/").json()["error"]["code"] == "unauthenticated"  # API clients: JSON, as the API says
    assert log_in(client, ADMIN_SECRET).status_code == 303
    assert client.get("/", headers=BROWSER).status_code == 200
