"""A registry that cannot serve: a proxy's page (502, 503, 504 without the registry's error body)
where the registry should answer, a database whose schema fell behind the running server, and
503s with Retry-After that idempotent requests wait out. Real servers on loopback throughout:
the registry under uvicorn, and a small HTTP server standing where a proxy would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory

from cli import errors as exit_codes
from registry.client.api import RegistryApi
from registry.client.errors import RegistryUnavailableError
from registry.common.errors import NotFoundError, SchemaOutOfDateError
from registry.server.db import Database
from registry.server.migrate import alembic_config, current_revision, head_revision
from tests.support.corpus import delta_bytes, sha256
from tests.support.harness import FrontServer, setup_repo

from .conftest import BACKENDS

PROXY_PAGE = (
    b"<html><head><title>Service Unavailable</title></head><body><h1>No healthy upstream</h1></body></html>"
)


def _deltactl(home: Path, registry: str, *args, env: dict | None = None):
    """`deltactl ARGS` in-process against `registry`, with its own DELTACTL_HOME and no token."""
    from typer.testing import CliRunner

    from cli.main import app

    full = {"DELTACTL_HOME": str(home), "DELTACTL_REGISTRY": registry, "DELTACTL_TOKEN": None, **(env or {})}
    return CliRunner().invoke(app, [str(a) for a in args], env=full)


# --- a proxy answers instead of the registry ------------------------------------------------
@pytest.mark.parametrize(
    ("status", "reason"), [(502, "Bad Gateway"), (503, "Service Unavailable"), (504, "Gateway Timeout")]
)
def test_a_proxy_page_instead_of_the_registry_is_registry_unavailable(tmp_path, status, reason):
    """A 502/503/504 whose body is a proxy's HTML page, not the registry's error: the client
    raises RegistryUnavailableError naming the URL and the status, and deltactl exits with the
    network code (6), not the generic 1."""
    home = tmp_path / "home"
    with FrontServer() as front:
        front.answer("GET", r"/v1/.*", status, PROXY_PAGE, times=100)

        def expected(path: str) -> str:
            return (
                f"the registry at {front.url} is unavailable: GET "
                f"{front.url}{path} answered HTTP {status} {reason} "
                "without the registry's error body (a proxy or "
                "load balancer in front of the registry answered "
                "for it); retry shortly"
            )

        with RegistryApi(front.url, home=home) as api:
            with pytest.raises(RegistryUnavailableError) as info:
                api.repos()
            assert str(info.value) == expected("/v1/repos") and info.value.status == status
            with pytest.raises(RegistryUnavailableError) as info:
                api.pull("acme/math:prod")
            assert str(info.value) == expected("/v1/repos/acme/math/versions/prod")
        for args, path in ((["list"], "/v1/repos"), (["show", "acme/math"], "/v1/repos/acme/math")):
            r = _deltactl(home, front.url, *args)
            assert r.exit_code == exit_codes.EXIT_NETWORK == 6, r.output
            assert r.stderr == f"error: registry unavailable: {expected(path)}\n", r.stderr


# --- the database schema fell behind the running server --------------------------------------
@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_a_registry_whose_schema_fell_behind_says_to_run_db_upgrade(live_server, migrated_url, tmp_path):
    """The registry runs at the schema head; then its database is taken one migration back. Every
    request the old schema cannot serve answers 503 `schema_out_of_date` (not a retryable
    `database_unavailable`, not a 500); the client raises SchemaOutOfDateError telling the operator
    to run `deltactl db upgrade`, deltactl exits with 6; after `deltactl db upgrade` the same
    server process serves again and nothing was lost."""
    server = live_server()
    home = tmp_path / "home"
    delta = tmp_path / "one.bdelta"
    delta.write_bytes(delta_bytes(1))
    with server.client() as c:
        setup_repo(c, "acme/math")
    assert _deltactl(home, server.url, "push", delta, "acme/math").exit_code == 0

    head = head_revision()
    # Back to before versions.upload_id (0003), a column every version read uses; revisions since
    # change only what pushes use.
    behind = ScriptDirectory.from_config(alembic_config()).get_revision("0003").down_revision
    db = Database.from_url(migrated_url)
    try:
        command.downgrade(alembic_config(db.engine), behind)
        assert current_revision(db.engine) == behind
    finally:
        db.dispose()

    with server.client() as c:
        r = c.get("/v1/repos")
    assert r.status_code == 503 and "retry-after" not in r.headers, r.text
    server_message = (
        f"the registry's database is at schema revision {behind}, but this server needs revision {head}; "
        "run `deltactl db upgrade` with this server's DELTASTORE_DATABASE_URL"
    )
    assert r.json() == {"error": {"code": "schema_out_of_date", "message": server_message}}
    expected = (
        f"the registry at {server.url} cannot serve requests until its database schema is upgraded: "
        f"{server_message}. Nothing was changed; retrying fails the same way until the registry's operator "
        "has done so"
    )
    with RegistryApi(server.url, home=tmp_path / "other-home") as api:
        for call in (api.repos, lambda: api.version("acme/math"), lambda: api.pull("acme/math")):
            with pytest.raises(SchemaOutOfDateError) as info:
                call()
            assert str(info.value) == expected
    for args in (["list"], ["show", "acme/math"], ["pull", "acme/math@1"]):
        r = _deltactl(tmp_path / "other-home", server.url, *args)
        assert r.exit_code == exit_codes.EXIT_NETWORK == 6, r.output
        assert r.stderr == f"error: schema out of date: {expected}\n", r.stderr

    fixed = _deltactl(
        home,
        server.url,
        "db",
        "upgrade",
        env={"DELTASTORE_DATABASE_URL": migrated_url, "DELTASTORE_DATA_DIR": str(tmp_path / "data")},
    )
    assert fixed.exit_code == 0, fixed.output
    r = _deltactl(tmp_path / "other-home", server.url, "pull", "acme/math", "--json")
    assert r.exit_code == 0, r.output
    pulled = json.loads(r.stdout)
    assert pulled["version"] == 1 and sha256(Path(pulled["path"]).read_bytes()) == sha256(delta_bytes(1))


# --- 503 with Retry-After: idempotent requests wait it out, others never ---------------------
DB_BLIP = (
    b'{"error": {"code": "database_unavailable", "message": "the registry database is unavailable; '
    b'retry shortly"}}'
)


@pytest.fixture
def registry_behind_a_front(live_server, tmp_path):
    """A live registry holding acme/math@1, and a FrontServer passing requests on to it."""
    server = live_server()
    delta = tmp_path / "one.bdelta"
    delta.write_bytes(delta_bytes(1))
    with server.client() as c:
        setup_repo(c, "acme/math")
    assert _deltactl(tmp_path / "pusher", server.url, "push", delta, "acme/math").exit_code == 0
    with FrontServer(upstream=server.url) as front:
        yield front


def test_idempotent_requests_wait_out_a_503_with_retry_after(registry_behind_a_front, tmp_path):
    """Answered 503 + `Retry-After: 1` once, then by the registry: list, show, pull's metadata and
    the download each succeed, after exactly two requests and a wait of the second asked for."""
    import time

    front = registry_behind_a_front
    with RegistryApi(front.url, home=tmp_path / "home") as api:
        calls = [
            (
                "/v1/repos",
                PROXY_PAGE,
                "text/html",
                lambda: [r.full_name for r in api.repos()] == ["acme/math"],
            ),
            (
                "/v1/repos/acme/math",
                DB_BLIP,
                "application/json",
                lambda: api.repo("acme/math").latest_version == 1,
            ),
            (
                "/v1/repos/acme/math/versions/latest",
                DB_BLIP,
                "application/json",
                lambda: api.version("acme/math").number == 1,
            ),
            (
                "/v1/repos/acme/math/versions/1/download",
                PROXY_PAGE,
                "text/html",
                lambda: sha256(Path(api.pull("acme/math@1").blob).read_bytes()) == sha256(delta_bytes(1)),
            ),
        ]
        for path, body, content_type, call in calls:
            front.answer("GET", path, 503, body, {"Retry-After": "1"}, content_type=content_type)
            started = time.monotonic()
            assert call(), path
            assert front.count("GET", path) == 2, (path, front.requests)
            assert time.monotonic() - started >= 1.0, path
            front.reset()


def test_retries_on_503_are_bounded(registry_behind_a_front, tmp_path, monkeypatch):
    """At most three tries; none when Retry-After asks for more than the budget (10 s) or is
    missing; none when DELTACTL_UNAVAILABLE_MAX_WAIT is 0."""
    import time

    front = registry_behind_a_front
    path = "/v1/repos/acme/math"
    cases = [
        ({"Retry-After": "1"}, None, 3),
        ({"Retry-After": "11"}, None, 1),
        ({}, None, 1),
        ({"Retry-After": "1"}, "0", 1),
        ({"Retry-After": "1"}, "1.5", 2),
    ]
    for headers, max_wait, tries in cases:
        if max_wait is None:
            monkeypatch.delenv("DELTACTL_UNAVAILABLE_MAX_WAIT", raising=False)
        else:
            monkeypatch.setenv("DELTACTL_UNAVAILABLE_MAX_WAIT", max_wait)
        front.answer("GET", path, 503, PROXY_PAGE, headers, times=5)
        started = time.monotonic()
        with (
            RegistryApi(front.url, home=tmp_path / "home") as api,
            pytest.raises(RegistryUnavailableError) as info,
        ):
            api.repo("acme/math")
        took = time.monotonic() - started
        assert front.count("GET", path) == tries, (headers, max_wait, front.requests)
        assert tries - 1 <= took < tries + 2, (headers, max_wait, took)
        assert info.value.status == 503 and str(info.value).endswith(
            f"; retry in {headers['Retry-After']} s" if headers else "; retry shortly"
        ), str(info.value)
        front.reset()


def test_non_idempotent_requests_never_retry_on_a_503(registry_behind_a_front, tmp_path):
    """POST, PUT and DELETE answered 503 + Retry-After: sent exactly once, the error raised."""
    from registry.common.errors import DatabaseUnavailableError

    front = registry_behind_a_front
    with RegistryApi(front.url, home=tmp_path / "home", unavailable_max_wait=10) as api:
        calls = [
            ("POST", "/v1/repos", lambda: api.create_repo("acme/code", base="org/base")),
            ("PUT", "/v1/repos/acme/math/tags/prod", lambda: api.set_tag("acme/math", "prod", 1)),
            ("DELETE", "/v1/repos/acme/math/versions/1", lambda: api.delete_version("acme/math", 1)),
        ]
        for method, path, call in calls:
            front.answer(method, path, 503, DB_BLIP, {"Retry-After": "1"}, content_type="application/json")
            with pytest.raises(DatabaseUnavailableError):
                call()
            assert front.count(method, path) == 1, (method, path, front.requests)
        # and the registry itself saw none of them: nothing changed
        assert [t.name for t in api.tags("acme/math")] == ["latest"]
        assert [v.number for v in api.versions("acme/math")] == [1]
        with pytest.raises(NotFoundError):
            api.repo("acme/code")
