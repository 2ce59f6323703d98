"""Who may do what, and what never leaks: the token matrix over every write and admin endpoint,
tokens stored only as hashes and compared in constant time, presigned URLs short-lived and scoped
to one object, no secret in any log line or error body, upload limits enforced before storage,
request bodies streamed."""

from __future__ import annotations

import datetime as dt
import hmac
import os
import re
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from sqlalchemy import update

from registry.server.db import Database
from registry.server.models import ApiToken, utcnow
from tests.support.corpus import delta_bytes, storage_form
from tests.support.harness import RegistryProcess, http_push, migrate, part_targets, send_bytes, setup_repo

from .conftest import BACKENDS

ADMIN = "admin-secret-Zq8v"
CALLERS = ["none", "revoked", "expired", "read", "other", "write", "nsadmin", "admin"]
WRITE, NS_ADMIN, GLOBAL_ADMIN = {"write", "nsadmin", "admin"}, {"nsadmin", "admin"}, {"admin"}


class World:
    """An auth-on registry: acme/math with two versions, pending uploads in each state, a token per caller."""

    def __init__(self, client, settings):
        self.client, self.settings = client, settings
        self.headers = {"none": {}, "admin": {"Authorization": f"Bearer {ADMIN}"}}
        admin = self.headers["admin"]
        setup_repo(client, "acme/math", headers=admin)
        spare = {"name": "acme/spare", "fingerprint": "sha256:" + "34" * 32}  # a base no repository uses
        assert client.post("/v1/bases", json=spare, headers=admin).status_code == 201
        for i in (1, 2):
            assert (
                http_push(client, "acme/math", storage_form(delta_bytes(i)), headers=admin).status_code == 201
            )
        assert (
            client.put("/v1/repos/acme/math/tags/prod", json={"version": 1}, headers=admin).status_code == 200
        )
        scopes = {
            "read": ("acme", "read"),
            "other": ("other", "write"),
            "write": ("acme", "write"),
            "nsadmin": ("acme", "admin"),
            "revoked": ("acme", "write"),
            "expired": ("acme", "write"),
        }
        self.token_ids = {}
        for caller, (ns, perm) in scopes.items():
            r = client.post(
                "/v1/tokens",
                json={"name": caller, "scopes": [{"namespace": ns, "permission": perm}]},
                headers=admin,
            )
            assert r.status_code == 201, r.text
            self.headers[caller] = {"Authorization": f"Bearer {r.json()['token']}"}
            self.token_ids[caller] = r.json()["id"]
        assert client.delete(f"/v1/tokens/{self.token_ids['revoked']}", headers=admin).status_code == 204
        db = Database.from_url(settings.resolved_database_url)
        with db.write() as s:
            s.execute(
                update(ApiToken)
                .where(ApiToken.id == self.token_ids["expired"])
                .values(expires_at=utcnow() - dt.timedelta(seconds=1))
            )
        db.dispose()
        # uploads in every state the upload endpoints act on
        self.blob = storage_form(delta_bytes(3))
        self.declared = self._declare(self.blob)  # nothing sent yet
        self.sent_blob = storage_form(delta_bytes(4))
        self.sent = self._declare(self.sent_blob)
        assert send_bytes(client, self.sent, self.sent_blob.data, headers=admin) is None

    def _declare(self, blob) -> dict:
        r = self.client.post(
            "/v1/repos/acme/math/uploads", json=blob.declaration(), headers=self.headers["admin"]
        )
        assert r.status_code == 201, r.text
        return r.json()

    def snapshot(self) -> tuple:
        """Everything a refused call could have changed."""
        admin = self.headers["admin"]
        get = lambda path: self.client.get(path, headers=admin).json()  # noqa: E731
        staging = sorted(os.listdir(self.settings.data_dir / "blobs" / "staging"))
        return (
            get("/v1/repos"),
            get("/v1/bases"),
            get("/v1/repos/acme/math/versions"),
            get("/v1/repos/acme/math/tags"),
            get("/v1/tokens"),
            len(get("/v1/audit?limit=500")["items"]),
            staging,
            self.client.get(f"/v1/uploads/{self.declared['id']}", headers=admin).status_code,
            self.client.get(f"/v1/uploads/{self.sent['id']}", headers=admin).status_code,
        )


# endpoint -> (who may call it, the call)
ENDPOINTS = {
    "register base": (
        WRITE,
        lambda w, h: w.client.post(
            "/v1/bases", json={"name": "acme/base2", "fingerprint": "sha256:" + "12" * 32}, headers=h
        ),
    ),
    "delete base": (NS_ADMIN, lambda w, h: w.client.delete("/v1/bases/acme/spare", headers=h)),
    "create repository": (
        WRITE,
        lambda w, h: w.client.post(
            "/v1/repos", json={"namespace": "acme", "name": "new", "base": "org/base"}, headers=h
        ),
    ),
    "delete repository": (NS_ADMIN, lambda w, h: w.client.delete("/v1/repos/acme/math", headers=h)),
    "declare upload": (
        WRITE,
        lambda w, h: w.client.post(
            "/v1/repos/acme/math/uploads", json=storage_form(delta_bytes(9)).declaration(), headers=h
        ),
    ),
    "resume upload": (WRITE, lambda w, h: w.client.get(f"/v1/uploads/{w.declared['id']}", headers=h)),
    "part urls": (WRITE, lambda w, h: w.client.get(f"/v1/uploads/{w.declared['id']}/parts", headers=h)),
    "send upload bytes": (
        WRITE,
        lambda w, h: w.client.put(w.declared["upload_url"], content=w.blob.data, headers=h),
    ),
    "complete upload": (WRITE, lambda w, h: w.client.post(w.sent["complete_url"], headers=h)),
    "abort upload": (WRITE, lambda w, h: w.client.delete(f"/v1/uploads/{w.sent['id']}", headers=h)),
    "set tag": (
        WRITE,
        lambda w, h: w.client.put("/v1/repos/acme/math/tags/stable", json={"version": 2}, headers=h),
    ),
    "delete tag": (WRITE, lambda w, h: w.client.delete("/v1/repos/acme/math/tags/prod", headers=h)),
    "delete version": (WRITE, lambda w, h: w.client.delete("/v1/repos/acme/math/versions/1", headers=h)),
    "create token": (
        GLOBAL_ADMIN,
        lambda w, h: w.client.post(
            "/v1/tokens",
            json={"name": "t", "scopes": [{"namespace": "acme", "permission": "read"}]},
            headers=h,
        ),
    ),
    "list tokens": (GLOBAL_ADMIN, lambda w, h: w.client.get("/v1/tokens", headers=h)),
    "revoke token": (
        GLOBAL_ADMIN,
        lambda w, h: w.client.delete(f"/v1/tokens/{w.token_ids['read']}", headers=h),
    ),
    "gc": (GLOBAL_ADMIN, lambda w, h: w.client.post("/v1/admin/gc", headers=h)),
    "fsck": (GLOBAL_ADMIN, lambda w, h: w.client.get("/v1/admin/fsck", headers=h)),
    "audit log": (GLOBAL_ADMIN, lambda w, h: w.client.get("/v1/audit", headers=h)),
}
#: (method, path template) of every endpoint above, to prove the matrix covers the whole API.
COVERED = {
    ("POST", "/v1/bases"),
    ("DELETE", "/v1/bases/{org}/{model}"),
    ("POST", "/v1/repos"),
    ("DELETE", "/v1/repos/{namespace}/{name}"),
    ("POST", "/v1/repos/{namespace}/{name}/uploads"),
    ("GET", "/v1/uploads/{upload_id}"),
    ("GET", "/v1/uploads/{upload_id}/parts"),
    ("PUT", "/v1/uploads/{upload_id}"),
    ("POST", "/v1/uploads/{upload_id}/complete"),
    ("DELETE", "/v1/uploads/{upload_id}"),
    ("PUT", "/v1/repos/{namespace}/{name}/tags/{tag}"),
    ("DELETE", "/v1/repos/{namespace}/{name}/tags/{tag}"),
    ("DELETE", "/v1/repos/{namespace}/{name}/versions/{ref}"),
    ("POST", "/v1/tokens"),
    ("GET", "/v1/tokens"),
    ("DELETE", "/v1/tokens/{token_id}"),
    ("POST", "/v1/admin/gc"),
    ("GET", "/v1/admin/fsck"),
    ("GET", "/v1/audit"),
}
#: Reads that anyone may make on public repositories (anonymous reads are on by default).
PUBLIC_READS = {
    ("GET", "/v1/bases"),
    ("GET", "/v1/bases/{org}/{model}"),
    ("GET", "/v1/bases/{org}/{model}/repos"),
    ("GET", "/v1/repos"),
    ("GET", "/v1/repos/{namespace}/{name}"),
    ("GET", "/v1/repos/{namespace}/{name}/versions"),
    ("GET", "/v1/repos/{namespace}/{name}/versions/{ref}"),
    ("GET", "/v1/repos/{namespace}/{name}/versions/{ref}/download"),
    ("GET", "/v1/repos/{namespace}/{name}/tags"),
    ("GET", "/v1/whoami"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
}


def test_the_matrix_covers_every_operation(client):
    operations = {
        (m.upper(), path) for path, item in client.get("/openapi.json").json()["paths"].items() for m in item
    }
    assert operations - COVERED - PUBLIC_READS == set(), "an operation missing from the token matrix"
    assert COVERED | PUBLIC_READS >= operations


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_token_matrix(make_client, make_settings, endpoint):
    world = World(make_client(auth_enabled=True, admin_token=ADMIN), make_settings())
    allowed, call = ENDPOINTS[endpoint]
    before = world.snapshot()
    for caller in CALLERS:
        r = call(world, world.headers[caller])
        if caller in allowed:
            assert r.status_code < 300, (caller, r.status_code, r.text)
            break  # the first allowed caller changes the state
        expected = 401 if caller in ("none", "revoked", "expired") else 403
        assert r.status_code == expected, (endpoint, caller, r.status_code, r.text)
        assert r.json()["error"]["code"] == ("unauthenticated" if expected == 401 else "forbidden")
        if expected == 401:
            assert r.headers["www-authenticate"] == "Bearer"
        assert world.snapshot() == before, f"a refused call by {caller} changed the registry"
    else:
        pytest.fail(f"nobody may call {endpoint}")


def test_revoked_and_expired_tokens_cannot_even_read_private_data(make_client, make_settings):
    world = World(make_client(auth_enabled=True, admin_token=ADMIN, anonymous_read=False), make_settings())
    for caller in ("revoked", "expired"):
        r = world.client.get("/v1/repos/acme/math", headers=world.headers[caller])
        assert r.status_code == 401, r.text
        assert ("expired" in r.json()["error"]["message"]) == (caller == "expired")
    assert world.client.get("/v1/repos/acme/math", headers=world.headers["read"]).status_code == 200
    # a token created with a lifetime says when it ends, and works until then
    r = world.client.post(
        "/v1/tokens",
        json={
            "name": "short",
            "scopes": [{"namespace": "acme", "permission": "read"}],
            "expires_in_seconds": 3600,
        },
        headers=world.headers["admin"],
    )
    created = r.json()
    assert 3590 < (dt.datetime.fromisoformat(created["expires_at"]) - utcnow()).total_seconds() <= 3600
    assert (
        world.client.get("/v1/whoami", headers={"Authorization": f"Bearer {created['token']}"}).status_code
        == 200
    )


def test_only_hashes_of_tokens_are_stored(make_client, make_settings):
    world = World(make_client(auth_enabled=True, admin_token=ADMIN), make_settings())
    secrets_ = [h["Authorization"].split()[1] for c, h in world.headers.items() if c not in ("none", "admin")]
    db = Database.from_url(make_settings().resolved_database_url)
    with db.engine.connect() as conn:
        dump = "\n".join(
            str(row)
            for table in ("api_tokens", "token_scopes", "audit_events")
            for row in conn.exec_driver_sql(f"SELECT * FROM {table}")
        )
    db.dispose()
    for secret in secrets_ + [ADMIN]:
        assert (
            secret not in dump and secret[10:] not in dump
        )  # (the 10-character prefix `dst_xxxxxx` names a token)
    import hashlib

    assert all(hashlib.sha256(s.encode()).hexdigest() in dump for s in secrets_)
    listing = world.client.get("/v1/tokens", headers=world.headers["admin"]).text
    assert not any(s in listing for s in secrets_)


def test_the_admin_secret_is_compared_in_constant_time(make_client, monkeypatch):
    """The bootstrap admin secret is compared with hmac.compare_digest; API tokens are looked up by
    the sha256 of the presented secret, so lookup timing reveals nothing about stored secrets."""
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("registry.server.auth.hmac.compare_digest", spy)
    client = make_client(auth_enabled=True, admin_token=ADMIN)
    for guess in (ADMIN, ADMIN[:-1] + "x", "x"):
        client.get("/v1/whoami", headers={"Authorization": f"Bearer {guess}"})
    assert [a for a, _ in calls] == [ADMIN.encode(), (ADMIN[:-1] + "x").encode(), b"x"]


# --- S3: presigned URLs ----------------------------------------------------------------------
AWS_SECRET = "aws-Secret-Key-never-shown-0042"


def test_presigned_urls_are_short_lived_and_scoped_to_one_object(
    make_client, s3_endpoint, s3_bucket, monkeypatch
):
    ttl = 300
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)  # (moto accepts any secret)
    client = make_client(
        blob_url=f"s3://{s3_bucket}/reg",
        s3_endpoint_url=s3_endpoint,
        presign_ttl_seconds=ttl,
        multipart_threshold=8 << 10,
        multipart_part_size=5 << 10,
    )
    setup_repo(client, "acme/math")
    small, big = storage_form(delta_bytes(1)), storage_form(delta_bytes(2, rows=512, width_bytes=64))
    assert small.size <= 8 << 10 < big.size
    bodies, urls = [], []
    for blob in (small, big):
        r = client.post("/v1/repos/acme/math/uploads", json=blob.declaration())
        bodies.append(r.text)
        upload = r.json()
        urls += (
            [upload["upload_url"]]
            if upload["upload_url"]
            else [u for u, _, _ in part_targets(client, upload, blob.size)]
        )
        assert send_bytes(client, upload, blob.data) is None
        assert client.post(upload["complete_url"]).status_code == 201
    r = client.get("/v1/repos/acme/math/versions/1/download", follow_redirects=False)
    assert r.status_code == 307
    urls.append(r.headers["location"])
    for url in urls:
        parsed = urlparse(url)
        query = parse_qs(parsed.query)
        assert query["X-Amz-Expires"] == [str(ttl)], url
        assert query["X-Amz-SignedHeaders"] == ["host"]
        # exactly one object key under the prefix: no wildcard, no bucket-level operation
        assert re.fullmatch(
            rf"/{s3_bucket}/reg/(uploads/[0-9a-f]{{32}}|parts/[0-9a-f]{{32}}/[0-9]+"
            rf"|blobs/(uploads/[0-9a-f]{{32}}|sha256/[0-9a-f]{{64}}))",
            parsed.path,
        ), url
        assert "X-Amz-Security-Token" not in query
    assert not any(AWS_SECRET in text for text in bodies + urls + [r.text])


# --- secrets in logs and error bodies --------------------------------------------------------
def test_no_secret_in_logs_or_error_bodies(tmp_path, s3_endpoint, s3_bucket, pg_cluster):
    db_password = "pg-Pa55word-never-shown"
    database_url = pg_cluster.url.replace("postgres@", f"postgres:{db_password}@")  # trust auth ignores it
    aws_secret = AWS_SECRET
    env = {
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "DELTASTORE_DATA_DIR": str(tmp_path / "data"),
        "DELTASTORE_DATABASE_URL": database_url,
        "DELTASTORE_BLOB_URL": f"s3://{s3_bucket}/reg",
        "DELTASTORE_S3_ENDPOINT_URL": s3_endpoint,
        "DELTASTORE_AUTH_ENABLED": "true",
        "DELTASTORE_ADMIN_TOKEN": ADMIN,
    }
    migrate(env)
    log = tmp_path / "server.log"
    bodies: list[str] = []
    with RegistryProcess(env, log_path=log) as server, server.client() as c:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        r = c.post(
            "/v1/tokens",
            json={"name": "w", "scopes": [{"namespace": "acme", "permission": "write"}]},
            headers=admin,
        )
        token = r.json()["token"]
        setup_repo(c, "acme/math", headers=admin)
        blob = storage_form(delta_bytes(1))
        for headers in (
            {"Authorization": f"Bearer {token}x"},
            {"Authorization": f"Bearer {ADMIN}x"},
            {"Authorization": f"Basic {token}"},
            {"Authorization": token},
        ):
            bodies.append(
                c.post("/v1/repos/acme/math/uploads", json=blob.declaration(), headers=headers).text
            )
        auth = {"Authorization": f"Bearer {token}"}
        bodies.append(
            c.post(
                "/v1/repos/acme/math/uploads",
                json=blob.declaration(digest="sha256:" + "0" * 64),
                headers=auth,
            ).text
        )
        upload = c.post("/v1/repos/acme/math/uploads", json=blob.declaration(), headers=auth).json()
        bodies.append(c.post(upload["complete_url"], headers=auth).text)  # nothing sent: 409
        bodies.append(c.get("/v1/repos/acme/nothing", headers=auth).text)
        bodies.append(c.get("/v1/admin/fsck", headers=admin).text)
        bodies.append(c.get("/metrics").text)
        # the database goes away: the 503 body and the log must not show the connection string
        pg_cluster.stop("immediate")
        for _ in range(3):
            bodies.append(c.get("/v1/repos", headers=auth).text)
        bodies.append(c.get("/readyz").text)
        pg_cluster.start()
        # the bucket goes away: the 502 body names the failure, not the credentials
        import boto3

        s3 = boto3.resource("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        s3.Bucket(s3_bucket).objects.all().delete()
        s3.Bucket(s3_bucket).delete()
        bodies.append(c.post(upload["complete_url"], headers=auth).text)
        bodies.append(c.get("/readyz").text)
    text = log.read_text(errors="replace")
    assert "503" in "".join(bodies) or "database_unavailable" in "".join(bodies)
    for secret in (ADMIN, token, db_password, aws_secret):
        assert secret not in text, f"a secret appears in the server log: {secret[:4]}..."
        for body in bodies:
            assert secret not in body, f"a secret appears in a response body: {body[:200]}"


def test_a_refused_schema_check_hides_the_database_password(tmp_path, pg_cluster):
    database_url = pg_cluster.url.replace("postgres@", "postgres:hunter2-secret@")
    server = RegistryProcess(
        {"DELTASTORE_DATA_DIR": str(tmp_path), "DELTASTORE_DATABASE_URL": database_url},
        log_path=tmp_path / "server.log",
    )
    with pytest.raises(RuntimeError) as info:
        server.start(timeout=30)
    assert "deltactl db upgrade" in str(info.value) and "hunter2-secret" not in str(info.value)
    assert "hunter2-secret" not in (tmp_path / "server.log").read_text()


# --- limits and streaming --------------------------------------------------------------------
def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_upload_limits_apply_before_anything_is_stored(registry_process, tmp_path):
    server = registry_process(max_upload_bytes=64 << 10, max_raw_bytes=1 << 20)
    staging = tmp_path / "data" / "blobs" / "staging"
    with server.client() as c:
        setup_repo(c, "acme/math")
        blob = storage_form(delta_bytes(1))
        for over in ({"size": (64 << 10) + 1}, {"raw_size": (1 << 20) + 1}):
            r = c.post("/v1/repos/acme/math/uploads", json=blob.declaration(**over))
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        upload = c.post("/v1/repos/acme/math/uploads", json=blob.declaration()).json()
        # a Content-Length other than the declared size is refused before the body is read
        r = c.put(upload["upload_url"], content=blob.data + b"x")
        assert r.status_code == 422 and list(staging.iterdir()) == []
        assert c.put(upload["upload_url"], content=blob.data).status_code == 404  # refused: dropped

        def endless():  # chunked: no length up front, cut off once past the declared size
            yield blob.data
            for _ in range(10_000):
                yield b"x" * 65536

        upload = c.post("/v1/repos/acme/math/uploads", json=blob.declaration()).json()
        r = c.put(upload["upload_url"], content=endless())
        assert r.status_code == 422 and r.json()["error"] == {
            "code": "size_mismatch",
            "message": f"received more than the {blob.size} bytes the upload declared",
        }
        assert list(staging.iterdir()) == []  # the partial file was removed
        # streamed (no size declared): cut off past what the raw size can compress to
        upload = c.post("/v1/repos/acme/math/uploads", json={"raw_size": blob.raw_size}).json()
        r = c.put(upload["upload_url"], content=endless())
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert r.json()["error"]["message"].startswith("received more than the ")
        assert list(staging.iterdir()) == []
        assert c.get("/v1/repos/acme/math/versions").json()["items"] == []


class PeakRss:
    """Samples a process's resident memory in a thread while a block runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def __enter__(self) -> PeakRss:
        self.baseline = self.peak = _rss_kib(self.pid)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_kib(self.pid))
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def grew_mib(self) -> float:
        return (self.peak - self.baseline) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read the server's memory")
def test_request_and_response_bodies_are_streamed(registry_process):
    """A 128 MiB delta goes up, is verified and comes back down without the server holding it in memory."""
    blob = storage_form(delta_bytes(5, rows=2048, width_bytes=64 << 10))
    assert blob.size > 128 << 20
    server = registry_process(max_upload_bytes=blob.size, max_raw_bytes=blob.raw_size)
    with server.client(timeout=300) as c:
        setup_repo(c, "acme/math")
        upload = c.post("/v1/repos/acme/math/uploads", json=blob.declaration()).json()
        view = memoryview(blob.data)
        with PeakRss(server.pid) as up:
            r = c.put(
                upload["upload_url"],
                content=(bytes(view[i : i + (1 << 20)]) for i in range(0, blob.size, 1 << 20)),
            )
            assert r.status_code == 200, r.text
            assert c.post(upload["complete_url"]).status_code == 201
        with PeakRss(server.pid) as down, c.stream("GET", "/v1/repos/acme/math/versions/1/download") as r:
            import hashlib

            sha = hashlib.sha256()
            for part in r.iter_bytes(1 << 20):
                sha.update(part)
        assert "sha256:" + sha.hexdigest() == blob.digest
    assert up.grew_mib < 48, (
        f"the server grew by {up.grew_mib:.0f} MiB receiving and verifying {blob.size >> 20} MiB"
    )
    assert down.grew_mib < 48, f"the server grew by {down.grew_mib:.0f} MiB sending {blob.size >> 20} MiB"
