"""The app under uvicorn on loopback: concurrent pushes to one repository, an upload cut off
mid-body, and the operational endpoints."""

from __future__ import annotations

import datetime as dt
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from registry.server.blobstores import open_blob_store
from registry.server.db import Database
from registry.server.gc import collect_garbage
from registry.server.models import Upload, Version, utcnow
from tests.registry.conftest import BACKENDS
from tests.registry.helpers import error_of, push, setup_repo

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)


def test_concurrent_pushes_get_distinct_consecutive_numbers(live_server, delta_blobs, base_fingerprint):
    server = live_server()
    with server.client() as admin:
        setup_repo(admin, base_fingerprint)
    blobs = delta_blobs[:6] + delta_blobs[:2]  # six new blobs and two racing duplicates

    def one_push(blob):
        with server.client() as c:
            r = push(c, blob)
            assert r.status_code == 201, r.text
            return r.json()

    with ThreadPoolExecutor(max_workers=len(blobs)) as pool:
        results = list(pool.map(one_push, blobs))
    numbers = sorted(v["number"] for v in results)
    assert numbers == list(range(1, len(blobs) + 1))
    with server.client() as c:
        listed = c.get("/v1/repos/acme/math/versions", params={"limit": 100}).json()["items"]
        assert sorted(v["number"] for v in listed) == numbers
        assert {(v["number"], v["digest"]) for v in listed} == {(v["number"], v["digest"]) for v in results}
        assert c.get("/v1/repos/acme/math/versions/latest").json()["number"] == len(blobs)
        pushes = [
            e for e in c.get("/v1/audit", params={"limit": 100}).json()["items"] if e["action"] == "push"
        ]
        assert len(pushes) == len(blobs)


def test_interrupted_upload_leaves_no_version_and_gc_removes_it(
    live_server, make_settings, delta_blobs, base_fingerprint
):
    server = live_server()
    a = delta_blobs[0]
    with server.client() as c:
        setup_repo(c, base_fingerprint)
        upload = c.post("/v1/repos/acme/math/uploads", json=a.declaration()).json()
    # send the headers and half of the body, then drop the connection
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        f"PUT {upload['upload_url']} HTTP/1.1\r\nHost: "
        "127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {a.size}\r\n\r\n".encode()
        + a.data[: a.size // 2]
    )
    time.sleep(0.3)
    sock.close()
    time.sleep(0.3)

    settings = make_settings()
    staging = settings.data_dir / "blobs" / "staging"
    with server.client() as c:
        assert c.get("/v1/repos/acme/math/versions").json()["items"] == []
        assert c.get("/v1/repos/acme/math/versions/latest").status_code == 404
        r = c.post(upload["complete_url"])
        assert r.status_code == 409 and "no bytes" in error_of(r)["message"]
    # a crashed server could also leave a staging file without any upload row
    (staging / "0123456789abcdef0123456789abcdef").write_bytes(b"partial")

    db = Database.from_url(settings.resolved_database_url)
    later = utcnow() + dt.timedelta(seconds=settings.upload_ttl_seconds + settings.gc_grace_seconds + 60)
    report = collect_garbage(db=db, store=open_blob_store(settings), settings=settings, now=later)
    assert (report.stale_uploads, report.staged_objects) == (1, 1)
    assert list(staging.iterdir()) == []
    with db.read() as session:
        assert session.query(Upload).count() == 0 and session.query(Version).count() == 0
    db.dispose()


def test_health_ready_metrics_and_error_bodies(live_server, delta_blobs, base_fingerprint, make_settings):
    server = live_server()
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "blob_store": "ok"}
        setup_repo(c, base_fingerprint)
        assert push(c, delta_blobs[0]).status_code == 201
        assert c.get("/docs").status_code == 200
        assert "/v1/repos/{namespace}/{name}/uploads" in c.get("/openapi.json").json()["paths"]

        for response, status, code in [
            (c.get("/v1/nowhere"), 404, "not_found"),
            (c.get("/v1/repos/acme/nope"), 404, "not_found"),
            (c.delete("/v1/whoami"), 405, "method_not_allowed"),
            (c.post("/v1/repos", json={"namespace": "acme"}), 422, "invalid_request"),
            (
                c.post("/v1/repos/acme/math/uploads", json={"digest": "md5:x", "size": -1}),
                422,
                "invalid_request",
            ),
            (
                c.post("/v1/repos", json={"namespace": "acme", "name": "math", "base": "org/base"}),
                409,
                "conflict",
            ),
            (c.get("/v1/repos/Bad/x"), 400, "invalid_name"),
        ]:
            assert response.status_code == status, response.text
            assert error_of(response)["code"] == code

        metrics = c.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        assert 'deltastore_pushes_total{outcome="ready"} 1.0' in text
        assert 'route="/v1/repos/{namespace}/{name}/uploads",status="201"' in text
        assert "deltastore_http_request_duration_seconds_bucket" in text

    # readiness follows the blob store
    staging = make_settings().data_dir / "blobs" / "staging"
    staging.rename(staging.with_name("moved"))
    staging.write_bytes(b"not a directory")
    with server.client() as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["blob_store"].startswith("error")
