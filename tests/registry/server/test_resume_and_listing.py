"""What the client builds on: resuming a pending upload (fresh URLs, parts already received),
the latest version's summary in repository listings, and fidelity recorded on the version."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from codec.compress import CompressOptions, compress
from codec.storage import compress_blob
from tests.registry.conftest import BACKENDS
from tests.registry.helpers import BASE_NAME, error_of, push, setup_repo
from tests.support.harness import part_targets


@pytest.fixture
def s3_settings(s3_endpoint, s3_bucket):
    return {"blob_url": f"s3://{s3_bucket}/registry", "s3_endpoint_url": s3_endpoint}


def test_resumed_multipart_upload_lists_received_parts_with_fresh_urls(
    make_client, s3_settings, delta_blobs, base_fingerprint
):
    a = delta_blobs[2]
    part_size = a.size // 4 + 1
    client = make_client(**s3_settings, multipart_threshold=1024, multipart_part_size=part_size)
    setup_repo(client, base_fingerprint)
    upload = client.post("/v1/repos/acme/math/uploads", json=a.declaration()).json()
    assert upload["received_parts"] == [] and upload["part_size"] == part_size
    parts = part_targets(client, upload, a.size)
    assert len(parts) == 4
    for url, offset, size in (parts[0], parts[2]):
        assert httpx.put(url, content=a.data[offset : offset + size]).status_code == 200

    r = client.get(f"/v1/uploads/{upload['id']}")
    assert r.status_code == 200, r.text
    resumed = r.json()
    assert (
        resumed["id"] == upload["id"]
        and resumed["method"] == "s3-multipart"
        and resumed["repository"] == "acme/math"
        and resumed["part_size"] == part_size
    )
    md5 = [hashlib.md5(a.data[offset : offset + size]).hexdigest() for _, offset, size in parts]
    assert resumed["received_parts"] == [
        {"number": 1, "size": part_size, "etag": f'"{md5[0]}"'},
        {"number": 3, "size": part_size, "etag": f'"{md5[2]}"'},
    ]
    for url, offset, size in (part_targets(client, resumed, a.size)[i] for i in (1, 3)):  # fresh URLs
        assert httpx.put(url, content=a.data[offset : offset + size]).status_code == 200
    r = client.post(resumed["complete_url"])
    assert r.status_code == 201 and r.json()["digest"] == a.digest

    r = client.get(f"/v1/uploads/{upload['id']}")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"


def test_resumed_stream_and_single_put_uploads(make_client, s3_settings, delta_blobs, base_fingerprint):
    local = make_client()
    setup_repo(local, base_fingerprint)
    upload = local.post("/v1/repos/acme/math/uploads", json=delta_blobs[3].declaration()).json()
    resumed = local.get(f"/v1/uploads/{upload['id']}").json()
    assert resumed["method"] == "stream" and resumed["upload_url"] == f"/v1/uploads/{upload['id']}"

    s3 = make_client(**s3_settings)  # same database, blobs in S3
    setup_repo(s3, base_fingerprint, "acme/other")
    upload = s3.post("/v1/repos/acme/other/uploads", json=delta_blobs[3].declaration()).json()
    resumed = s3.get(f"/v1/uploads/{upload['id']}").json()
    assert resumed["method"] == "s3-put" and resumed["upload_url"].startswith(s3_settings["s3_endpoint_url"])
    assert httpx.put(resumed["upload_url"], content=delta_blobs[3].data).status_code == 200
    assert s3.post(resumed["complete_url"]).status_code == 201


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_listing_carries_the_latest_versions_summary(client, delta_blobs, base_fingerprint):
    setup_repo(client, base_fingerprint, "acme/math")
    setup_repo(client, base_fingerprint, "acme/empty")
    assert push(client, delta_blobs[0]).status_code == 201
    assert push(client, delta_blobs[1]).status_code == 201
    items = {r["full_name"]: r for r in client.get("/v1/repos").json()["items"]}
    assert items["acme/empty"]["latest"] is None and items["acme/empty"]["latest_version"] is None
    latest = items["acme/math"]["latest"]
    b = delta_blobs[1]
    assert items["acme/math"]["latest_version"] == latest["number"] == 2
    assert (latest["digest"], latest["size"], latest["raw_size"], latest["codec"]) == (
        b.digest,
        b.size,
        b.raw_size,
        "bitdelta",
    )
    assert latest["size_ratio"] > 1 and latest["ready_at"]
    by_base = client.get(f"/v1/bases/{BASE_NAME}/repos").json()["items"]
    assert {r["full_name"]: r["latest"] for r in by_base}["acme/math"] == latest


def test_fidelity_is_recorded_from_the_delta_or_the_declaration(
    client, llama_pair, tmp_path, delta_blobs, base_fingerprint
):
    fidelity = {"heldout_loss": 2.5, "gain_recovered": 0.93}
    calibration = {"dataset": "stdlib", "steps": 10, "final_loss": 0.1}
    raw = tmp_path / "f.bdelta"
    compress(
        *llama_pair,
        raw,
        CompressOptions(base_name=BASE_NAME),
        extra_metadata={"fidelity": json.dumps(fidelity), "calibration": json.dumps(calibration)},
    )
    info = compress_blob(raw, tmp_path / "f.bdelta.zst")
    setup_repo(client, base_fingerprint)
    declaration = {
        "digest": info.digest,
        "size": info.size,
        "raw_digest": info.raw_digest,
        "raw_size": info.raw_size,
    }
    upload = client.post("/v1/repos/acme/math/uploads", json=declaration).json()
    assert (
        client.put(upload["upload_url"], content=(tmp_path / "f.bdelta.zst").read_bytes()).status_code == 200
    )
    version = client.post(upload["complete_url"]).json()
    assert version["fidelity"] == fidelity
    assert json.loads(version["metadata"]["calibration"]) == calibration

    # a delta without the key keeps what the client declared
    r = push(client, delta_blobs[4], fidelity={"greedy_agreement": 0.8})
    assert r.status_code == 201 and r.json()["fidelity"] == {"greedy_agreement": 0.8}


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_every_cursor_the_schema_allows_is_answered(client, base_fingerprint):
    """A cursor is the position a page starts after, in decimal (the OpenAPI document says so):
    any string of digits is a valid position, clamped to the 32-bit ids; anything else is a 400."""
    for i in range(3):
        setup_repo(client, base_fingerprint, f"acme/r{i}")
    first = client.get("/v1/repos", params={"limit": 2}).json()
    assert [r["name"] for r in first["items"]] == ["r0", "r1"] and first["next_cursor"].isdigit()
    rest = client.get("/v1/repos", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [r["name"] for r in rest["items"]] == ["r2"] and rest["next_cursor"] is None
    for cursor, names in (
        ("", ["r0", "r1", "r2"]),
        ("0", ["r0", "r1", "r2"]),
        ("0000", ["r0", "r1", "r2"]),
        ("9" * 20, []),
    ):
        r = client.get("/v1/repos", params={"cursor": cursor})
        assert r.status_code == 200 and [x["name"] for x in r.json()["items"]] == names, cursor
    # the audit log runs newest first: everything is before the largest position
    assert client.get("/v1/audit", params={"cursor": "9" * 20}).json()["items"]
    for cursor in ("abc", "-1", "\u0663", "1.5"):
        r = client.get("/v1/repos", params={"cursor": cursor})
        assert r.status_code == 400, cursor
        message = f"invalid cursor {cursor!r} (a cursor is decimal digits)"
        assert error_of(r) == {"code": "invalid_request", "message": message}
    r = client.get("/v1/repos", params={"cursor": "9" * 21})
    assert r.status_code == 422 and error_of(r)["code"] == "invalid_request"
    param = next(
        p
        for p in client.get("/openapi.json").json()["paths"]["/v1/repos"]["get"]["parameters"]
        if p["name"] == "cursor"
    )
    assert (param["schema"]["pattern"], param["schema"]["anyOf"][0]["maxLength"]) == ("^[0-9]*$", 20)
