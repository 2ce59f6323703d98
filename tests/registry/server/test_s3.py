"""The S3 blob store against real S3 endpoints (moto's server and s3rver on loopback): bytes go
client <-> S3 through presigned URLs, the server verifies and promotes them."""

from __future__ import annotations

import datetime as dt
import hashlib

import httpx
import pytest

from registry.client.api import RegistryApi
from registry.server.blobstores import open_blob_store
from registry.server.db import Database
from registry.server.gc import collect_garbage
from registry.server.models import utcnow
from tests.registry.conftest import BACKENDS, S3_SERVERS
from tests.registry.helpers import error_of, push, setup_repo
from tests.support.harness import part_targets


@pytest.fixture
def s3_settings(s3_endpoint, s3_bucket):
    return {"blob_url": f"s3://{s3_bucket}/registry", "s3_endpoint_url": s3_endpoint}


def _keys(s3_client, bucket) -> list[str]:
    return sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", []))


@pytest.mark.parametrize("s3_endpoint", S3_SERVERS, indirect=True)
@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_presigned_single_put_then_presigned_get(
    make_client, s3_settings, s3_client, s3_bucket, delta_blobs, base_fingerprint
):
    client = make_client(**s3_settings)
    setup_repo(client, base_fingerprint)
    a = delta_blobs[0]
    upload = client.post("/v1/repos/acme/math/uploads", json=a.declaration()).json()
    assert upload["method"] == "s3-put" and upload["upload_url"].startswith(s3_settings["s3_endpoint_url"])
    assert httpx.put(upload["upload_url"], content=a.data).status_code == 200
    assert client.get("/v1/repos/acme/math/versions").json()["items"] == []
    r = client.post(upload["complete_url"])
    assert r.status_code == 201 and r.json()["number"] == 1
    # keys derive from the digest only; the staging object is gone
    assert _keys(s3_client, s3_bucket) == [f"registry/blobs/sha256/{a.digest.removeprefix('sha256:')}"]

    r = client.get("/v1/repos/acme/math/versions/1/download", follow_redirects=False)
    assert r.status_code == 307 and r.headers["etag"] == f'"{a.digest}"'
    got = httpx.get(r.headers["location"])
    assert got.status_code == 200 and got.content == a.data
    ranged = httpx.get(r.headers["location"], headers={"Range": "bytes=0-99"})
    assert ranged.status_code == 206 and ranged.content == a.data[:100]


def test_multipart_upload_with_tiny_parts(
    make_client, s3_settings, s3_client, s3_bucket, delta_blobs, base_fingerprint
):
    a = delta_blobs[1]
    part_size = a.size // 3 + 1
    client = make_client(**s3_settings, multipart_threshold=1024, multipart_part_size=part_size)
    setup_repo(client, base_fingerprint)
    upload = client.post("/v1/repos/acme/math/uploads", json=a.declaration()).json()
    assert upload["method"] == "s3-multipart" and upload["part_size"] == part_size
    assert upload["parts_url"] == f"/v1/uploads/{upload['id']}/parts"
    parts = part_targets(client, upload, a.size)
    assert [(offset, size) for _, offset, size in parts] == [
        (0, part_size),
        (part_size, part_size),
        (2 * part_size, a.size - 2 * part_size),
    ]

    # completing with a part missing is refused and can be retried
    for url, offset, size in parts[:2]:
        assert httpx.put(url, content=a.data[offset : offset + size]).status_code == 200
    r = client.post(upload["complete_url"])
    assert r.status_code == 409 and "3" in error_of(r)["message"]
    url, offset, size = parts[2]
    assert httpx.put(url, content=a.data[offset : offset + size]).status_code == 200
    r = client.post(upload["complete_url"])
    assert r.status_code == 201, r.text
    # the multipart object is the blob itself (no copy); its key derives from the upload id
    assert _keys(s3_client, s3_bucket) == [f"registry/blobs/uploads/{upload['id']}"]
    body = httpx.get(
        client.get("/v1/repos/acme/math/versions/latest/download", follow_redirects=False).headers["location"]
    ).content
    assert "sha256:" + hashlib.sha256(body).hexdigest() == a.digest
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


@pytest.mark.parametrize("s3_endpoint", ["s3rver"], indirect=True)
def test_multipart_push_to_an_endpoint_without_list_parts_round_trips(
    live_server, s3_settings, s3_client, s3_bucket, delta_blobs, base_fingerprint, tmp_path
):
    """s3rver has no ListParts: parts are objects of their own, which the registry reads and
    assembles itself, so a multipart push through the real client publishes the exact bytes."""
    a = delta_blobs[3]
    server = live_server(**s3_settings, multipart_threshold=1024, multipart_part_size=a.size // 2 + 1)
    with server.client() as http:
        setup_repo(http, base_fingerprint)
        with RegistryApi(server.url, home=tmp_path / "client") as api:
            result = api.push(a.raw_path, "acme/math")
            pulled = api.pull(f"acme/math@{result.version.number}", output=tmp_path / "pulled.bdelta").path
        assert [v["number"] for v in http.get("/v1/repos/acme/math/versions").json()["items"]] == [1]
    assert pulled.read_bytes() == a.raw_path.read_bytes()
    assert len(_keys(s3_client, s3_bucket)) == 1  # one assembled object, no leftovers


@pytest.mark.parametrize("s3_endpoint", S3_SERVERS, indirect=True)
def test_s3_mismatch_and_dedup(make_client, s3_settings, s3_client, s3_bucket, delta_blobs, base_fingerprint):
    client = make_client(**s3_settings)
    setup_repo(client, base_fingerprint)
    a, b = delta_blobs[:2]
    r = push(client, a, data=b.data)  # the bytes of another delta under a's declaration
    assert r.status_code == 422 and error_of(r)["code"] == "digest_mismatch"
    assert client.get("/v1/repos/acme/math/versions").json()["items"] == []
    assert _keys(s3_client, s3_bucket) == []
    assert push(client, a).status_code == 201
    again = client.post("/v1/repos/acme/math/uploads", json=a.declaration()).json()
    assert again["exists"] is True
    assert client.post(again["complete_url"]).json()["number"] == 2
    assert len(_keys(s3_client, s3_bucket)) == 1


def _gc_after_upload_ttl(settings):
    """One gc run as if a minute past the uploads' time to live."""
    db = Database.from_url(settings.resolved_database_url)
    later = utcnow() + dt.timedelta(seconds=settings.upload_ttl_seconds + 60)
    try:
        return collect_garbage(db=db, store=open_blob_store(settings), settings=settings, now=later)
    finally:
        db.dispose()


def test_gc_aborts_interrupted_multipart_uploads(
    make_client, make_settings, s3_settings, s3_client, s3_bucket, delta_blobs, base_fingerprint
):
    a = delta_blobs[2]
    client = make_client(**s3_settings, multipart_threshold=1024, multipart_part_size=a.size // 3 + 1)
    setup_repo(client, base_fingerprint)
    upload = client.post("/v1/repos/acme/math/uploads", json=a.declaration()).json()
    url, _, size = part_targets(client, upload, a.size)[0]
    assert httpx.put(url, content=a.data[:size]).status_code == 200  # then the client dies
    assert len(s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])) == 1
    assert client.get("/v1/repos/acme/math/versions").json()["items"] == []

    report = _gc_after_upload_ttl(make_settings(**s3_settings))
    assert report.stale_uploads == 1
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert _keys(s3_client, s3_bucket) == []
    assert client.post(upload["complete_url"]).status_code == 404


@pytest.mark.parametrize("s3_endpoint", ["s3rver"], indirect=True)
def test_gc_removes_an_abandoned_uploads_parts_on_a_store_without_multipart_listing(
    make_client, make_settings, s3_settings, s3_client, s3_bucket, delta_blobs, base_fingerprint
):
    """s3rver has no ListMultipartUploads or AbortMultipartUpload: gc still removes an abandoned
    upload's part objects and its pending version, and the listing it lacks is skipped."""
    a = delta_blobs[2]
    client = make_client(**s3_settings, multipart_threshold=1024, multipart_part_size=a.size // 3 + 1)
    setup_repo(client, base_fingerprint)
    upload = client.post("/v1/repos/acme/math/uploads", json={"raw_size": a.raw_size}).json()
    for url, offset, size in part_targets(client, upload, a.size)[:2]:  # then the client dies
        assert httpx.put(url, content=a.data[offset : offset + size]).status_code == 200
    assert any("/parts/" in key for key in _keys(s3_client, s3_bucket))

    report = _gc_after_upload_ttl(make_settings(**s3_settings))
    assert report.stale_uploads == 1
    assert _keys(s3_client, s3_bucket) == []
    assert client.post(upload["complete_url"], json=a.declaration()).status_code == 404


@pytest.mark.parametrize("s3_endpoint", S3_SERVERS, indirect=True)
def test_readyz_reports_an_unreachable_bucket(make_client, s3_settings, s3_client, s3_bucket):
    client = make_client(**s3_settings)
    assert client.get("/readyz").status_code == 200
    s3_client.delete_bucket(Bucket=s3_bucket)
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["database"] == "ok" and r.json()["checks"]["blob_store"].startswith("error")
    assert error_of(r)["code"] == "not_ready"
