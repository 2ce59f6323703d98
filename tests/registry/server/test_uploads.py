"""The two-phase push over the real app (local blob store) on SQLite and PostgreSQL: versions
appear only when verified, bytes are deduplicated, bad uploads leave nothing visible."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os

import pytest
import zstandard

from codec.storage import decompress_stream
from registry.server import crud
from registry.server.blobstores import LocalBlobStore
from registry.server.db import Database
from registry.server.gc import collect_garbage
from registry.server.models import Blob, Upload, Version, utcnow
from tests.registry.conftest import BACKENDS
from tests.registry.helpers import BASE_NAME, error_of, push, send_bytes, setup_repo

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)


def _rows(settings, model) -> int:
    db = Database.from_url(settings.resolved_database_url)
    with db.read() as session:
        n = crud.count_rows(session, model)
    db.dispose()
    return n


def _staging_files(settings) -> list[str]:
    return sorted(os.listdir(settings.resolved_blob_url.removeprefix("file://") + "/staging"))


def test_push_is_two_phase_and_latest_moves(client, delta_blobs, base_fingerprint):
    setup_repo(client, base_fingerprint)
    a, b = delta_blobs[:2]
    r = client.post("/v1/repos/acme/math/uploads", json=a.declaration(description="first"))
    assert r.status_code == 201, r.text
    upload = r.json()
    assert upload["method"] == "stream" and upload["exists"] is False
    send_bytes(client, upload, a.data)
    # bytes stored but not completed: nothing is visible yet
    assert client.get("/v1/repos/acme/math/versions").json()["items"] == []
    assert client.get("/v1/repos/acme/math/versions/latest").status_code == 404

    r = client.post(upload["complete_url"])
    assert r.status_code == 201, r.text
    v1 = r.json()
    assert (v1["number"], v1["digest"], v1["size"], v1["raw_digest"], v1["raw_size"]) == (
        1,
        a.digest,
        a.size,
        a.raw_digest,
        a.raw_size,
    )
    assert (
        v1["tags"] == ["latest"]
        and v1["codec"] == "bitdelta"
        and v1["bits"] == 1
        and v1["dtype"] == "float32"
    )
    assert v1["size_ratio"] > 1 and v1["description"] == "first"
    assert v1["metadata"]["base_fingerprint"] == base_fingerprint

    r = push(client, b)
    assert r.status_code == 201 and r.json()["number"] == 2
    assert client.get("/v1/repos/acme/math/versions/latest").json()["number"] == 2
    assert client.get("/v1/repos/acme/math").json()["latest_version"] == 2
    listed = client.get("/v1/repos/acme/math/versions").json()["items"]
    assert [v["number"] for v in listed] == [2, 1]
    assert listed[0]["tags"] == ["latest"] and listed[1]["tags"] == []
    # the completed upload is gone; completing it again names its version and publishes nothing
    assert client.get(f"/v1/uploads/{upload['id']}").status_code == 404
    r = client.post(upload["complete_url"])
    assert r.status_code == 200 and r.json()["number"] == 1 and r.json()["tags"] == [], r.text
    assert [v["number"] for v in client.get("/v1/repos/acme/math/versions").json()["items"]] == [2, 1]


def test_identical_bytes_share_one_blob(client, delta_blobs, base_fingerprint, make_settings):
    setup_repo(client, base_fingerprint, "acme/math")
    setup_repo(client, base_fingerprint, "other/copy")
    a = delta_blobs[0]
    assert push(client, a).status_code == 201
    r = client.post("/v1/repos/other/copy/uploads", json=a.declaration())
    upload = r.json()
    assert upload["exists"] is True and upload["method"] == "exists" and upload["upload_url"] is None
    r = client.post(upload["complete_url"])
    assert r.status_code == 201 and r.json()["digest"] == a.digest
    assert push(client, a).json()["number"] == 2  # the same bytes again in the same repo: a new version
    settings = make_settings()
    assert _rows(settings, Blob) == 1
    store = LocalBlobStore(settings.resolved_blob_url.removeprefix("file://"))
    assert [o.key for o in store.list_blobs()] == [LocalBlobStore.blob_key(a.digest)]


def test_dedup_declaration_must_match_the_stored_blob(client, delta_blobs, base_fingerprint):
    setup_repo(client, base_fingerprint)
    a = delta_blobs[0]
    assert push(client, a).status_code == 201
    r = client.post("/v1/repos/acme/math/uploads", json=a.declaration(raw_size=a.raw_size + 1))
    assert r.status_code == 422 and error_of(r)["code"] == "digest_mismatch"


def test_a_delta_of_another_checkpoint_under_the_same_base_name_is_refused_saying_so(client, delta_blobs):
    other = "sha256:" + "ab" * 32
    setup_repo(client, other, "acme/math")  # the delta's own base name, other weights
    r = push(client, delta_blobs[0])
    assert r.status_code == 409
    assert error_of(r) == {
        "code": "base_mismatch",
        "message": (
            f"acme/math holds deltas of base {BASE_NAME!r} "
            f"(fingerprint {other}); this upload was made for another "
            f"checkpoint of that name (fingerprint {delta_blobs[0].base_fingerprint})"
        ),
    }


def test_wrong_base_is_refused_naming_the_expected_base(client, delta_blobs, make_settings):
    setup_repo(client, "sha256:" + "ab" * 32, "acme/math", base="org/other-base")
    r = push(client, delta_blobs[0])
    assert r.status_code == 409
    err = error_of(r)
    assert err["code"] == "base_mismatch"
    assert "org/other-base" in err["message"] and BASE_NAME in err["message"]
    assert client.get("/v1/repos/acme/math/versions").json()["items"] == []
    settings = make_settings()
    assert _rows(settings, Upload) == 0 and _rows(settings, Version) == 0
    assert _staging_files(settings) == []
    assert list(LocalBlobStore(settings.data_dir / "blobs").list_blobs()) == []  # refused before promotion


@pytest.mark.parametrize("lie", ["digest", "size"])
def test_declared_digest_or_size_mismatch_is_refused_and_leaves_nothing(
    client, delta_blobs, base_fingerprint, make_settings, lie
):
    setup_repo(client, base_fingerprint)
    a, b = delta_blobs[:2]
    declared = a.declaration(digest=b.digest) if lie == "digest" else a.declaration(size=a.size + 10)
    upload = client.post("/v1/repos/acme/math/uploads", json=declared).json()
    r = client.put(upload["upload_url"], content=a.data)
    assert r.status_code == 422 and error_of(r)["code"] == f"{lie}_mismatch"
    if lie == "size":
        assert error_of(r)["message"] == f"request has {a.size} bytes but the upload declared {a.size + 10}"
    else:
        assert error_of(r)["message"] == (
            f"received bytes have digest {a.digest}, but the upload declared {b.digest}"
        )
    r = client.post(upload["complete_url"])  # refused bytes dropped the upload with its pending version
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    assert client.get("/v1/repos/acme/math/versions").json()["items"] == []
    assert client.get("/v1/repos/acme/math/versions/latest").status_code == 404
    settings = make_settings()
    assert _rows(settings, Version) == 0 and _rows(settings, Upload) == 0
    assert _rows(settings, Blob) == 0
    assert _staging_files(settings) == []


@pytest.mark.parametrize("named", ["digest", "size", "raw_digest", "raw_size"])
def test_complete_must_name_what_the_registry_received(
    client, delta_blobs, base_fingerprint, make_settings, named
):
    """Bytes through the registry are verified as they arrive (a streamed declaration: nothing to
    check them against yet); `complete` must then name exactly what they turned out to be."""
    setup_repo(client, base_fingerprint)
    a, b = delta_blobs[:2]
    upload = client.post("/v1/repos/acme/math/uploads", json={"raw_size": a.raw_size}).json()
    r = client.put(upload["upload_url"], content=iter([a.data]))  # chunked, as a streamed push sends it
    assert r.status_code == 200, r.text
    assert r.json() == {
        "id": upload["id"],
        "received": a.size,
        "digest": a.digest,
        "raw_size": a.raw_size,
        "raw_digest": a.raw_digest,
    }
    wrong = {"digest": b.digest, "size": a.size + 1, "raw_digest": b.raw_digest, "raw_size": a.raw_size + 1}
    r = client.post(upload["complete_url"], json=a.declaration(**{named: wrong[named]}))
    expected = {
        "digest": f"received bytes have digest {a.digest}, but the upload declared {b.digest}",
        "size": f"received {a.size} bytes but the upload declared {a.size + 1}",
        "raw_digest": (
            f"the blob does not decompress to the declared {a.raw_size} bytes with digest "
            f"{b.raw_digest} (it decompresses to {a.raw_digest})"
        ),
        "raw_size": f"`complete` names raw_size {a.raw_size + 1}, but the upload declared {a.raw_size}",
    }[named]
    code = "size_mismatch" if named.endswith("size") else "digest_mismatch"
    assert r.status_code == 422 and error_of(r)["code"] == code
    assert error_of(r)["message"] == expected
    assert client.get("/v1/repos/acme/math/versions").json()["items"] == []
    if named != "raw_size":  # named against the declaration: the received bytes stay, the upload too
        assert _staging_files(make_settings()) == []


def test_bytes_that_are_not_a_delta_are_refused(client, base_fingerprint):
    setup_repo(client, base_fingerprint)
    raw = os.urandom(4096)
    data = zstandard.ZstdCompressor(write_content_size=True).compress(raw)
    decl = {
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "raw_digest": "sha256:" + hashlib.sha256(raw).hexdigest(),
        "raw_size": len(raw),
    }
    upload = client.post("/v1/repos/acme/math/uploads", json=decl).json()
    r = client.put(upload["upload_url"], content=data)  # refused as it arrives, not at `complete`
    assert r.status_code == 422 and error_of(r)["code"] == "invalid_delta"
    assert error_of(r)["message"].startswith("upload is not a valid format-v1 delta: its header would be ")
    assert client.post(upload["complete_url"]).status_code == 404
    assert client.get("/v1/repos/acme/math/versions").json()["items"] == []


def test_oversized_upload_is_refused_before_bytes_are_stored(
    make_client, delta_blobs, base_fingerprint, make_settings
):
    a = delta_blobs[0]
    client = make_client(max_upload_bytes=a.size - 1)
    setup_repo(client, base_fingerprint)
    r = client.post("/v1/repos/acme/math/uploads", json=a.declaration())
    assert r.status_code == 413 and error_of(r)["code"] == "too_large"
    assert str(a.size - 1) in error_of(r)["message"]
    settings = make_settings()
    assert _rows(settings, Upload) == 0 and _rows(settings, Version) == 0
    assert _staging_files(settings) == []

    big = make_client(max_raw_bytes=a.raw_size - 1)
    r = big.post("/v1/repos/acme/math/uploads", json=a.declaration())
    assert r.status_code == 413


def test_more_bytes_than_declared_are_cut_off(client, delta_blobs, base_fingerprint, make_settings):
    setup_repo(client, base_fingerprint)
    a = delta_blobs[0]
    upload = client.post("/v1/repos/acme/math/uploads", json=a.declaration()).json()

    def body():  # chunked: no Content-Length to refuse up front
        yield a.data
        yield b"x" * 100_000

    r = client.put(upload["upload_url"], content=body())
    assert r.status_code == 422 and error_of(r) == {
        "code": "size_mismatch",
        "message": f"received more than the {a.size} bytes the upload declared",
    }
    assert _staging_files(make_settings()) == []


def test_gc_removes_unreferenced_blobs_and_stale_uploads(
    client, delta_blobs, base_fingerprint, make_settings
):
    setup_repo(client, base_fingerprint)
    a, b, c = delta_blobs[:3]
    assert push(client, a).status_code == 201
    assert push(client, b).status_code == 201
    pending = client.post("/v1/repos/acme/math/uploads", json=c.declaration()).json()
    send_bytes(client, pending, c.data)  # never completed
    assert client.delete("/v1/repos/acme/math/versions/1").status_code == 200
    assert client.get("/v1/repos/acme/math/versions/latest").json()["number"] == 2

    settings = make_settings()
    db = Database.from_url(settings.resolved_database_url)
    store = LocalBlobStore(settings.resolved_blob_url.removeprefix("file://"))
    now_report = collect_garbage(
        db=db, store=store, settings=settings
    )  # everything is within the grace period
    assert (now_report.blobs, now_report.stale_uploads) == (0, 0)
    later = utcnow() + dt.timedelta(seconds=settings.upload_ttl_seconds + settings.gc_grace_seconds + 60)
    report = collect_garbage(db=db, store=store, settings=settings, now=later)
    assert (report.blobs, report.stale_uploads) == (1, 1)
    assert [o.key for o in store.list_blobs()] == [LocalBlobStore.blob_key(b.digest)]
    assert _staging_files(settings) == []
    db.dispose()
    assert client.get("/v1/repos/acme/math/versions/2/download").status_code == 200


def test_deleting_a_version_names_the_tags_that_went_with_it(client, delta_blobs, base_fingerprint):
    setup_repo(client, base_fingerprint)
    for blob in delta_blobs[:3]:
        assert push(client, blob).status_code == 201
    for tag, number in (("prod", 1), ("stable", 1), ("rc", 3)):
        assert client.put(f"/v1/repos/acme/math/tags/{tag}", json={"version": number}).status_code == 200
    r = client.delete("/v1/repos/acme/math/versions/1")
    assert r.status_code == 200
    assert r.json() == {
        "repository": "acme/math",
        "number": 1,
        "removed_tags": ["prod", "stable"],
        "latest": 3,
    }
    assert {t["name"]: t["version"] for t in client.get("/v1/repos/acme/math/tags").json()} == {
        "latest": 3,
        "rc": 3,
    }
    # the newest: latest moves back (it is not one of the removed tags)
    assert client.delete("/v1/repos/acme/math/versions/3").json() == {
        "repository": "acme/math",
        "number": 3,
        "removed_tags": ["rc"],
        "latest": 2,
    }
    assert client.delete("/v1/repos/acme/math/versions/2").json() == {
        "repository": "acme/math",
        "number": 2,
        "removed_tags": [],
        "latest": None,
    }
    assert client.get("/v1/repos/acme/math/tags").json() == []
    events = client.get("/v1/audit", params={"target": "acme/math"}).json()["items"]
    assert [e["detail"] for e in events if e["action"] == "delete_version"] == [
        {"version": 2, "removed_tags": []},
        {"version": 3, "removed_tags": ["rc"]},
        {"version": 1, "removed_tags": ["prod", "stable"]},
    ]


def test_tags_move_and_resolve(client, delta_blobs, base_fingerprint):
    setup_repo(client, base_fingerprint)
    for blob in delta_blobs[:3]:
        assert push(client, blob).status_code == 201
    r = client.put("/v1/repos/acme/math/tags/prod", json={"version": 1})
    assert r.status_code == 200 and r.json()["version"] == 1
    assert client.get("/v1/repos/acme/math/versions/prod").json()["number"] == 1
    assert client.put("/v1/repos/acme/math/tags/prod", json={"version": 3}).json()["version"] == 3
    assert client.get("/v1/repos/acme/math/versions/prod").json()["tags"] == ["latest", "prod"]
    assert {t["name"]: t["version"] for t in client.get("/v1/repos/acme/math/tags").json()} == {
        "latest": 3,
        "prod": 3,
    }
    assert client.put("/v1/repos/acme/math/tags/prod", json={"version": 9}).status_code == 404
    r = client.put("/v1/repos/acme/math/tags/latest", json={"version": 1})
    assert r.status_code == 400 and "latest" in error_of(r)["message"]
    assert client.delete("/v1/repos/acme/math/tags/prod").status_code == 204
    assert client.get("/v1/repos/acme/math/versions/prod").status_code == 404
    # deleting the newest version moves latest back
    assert client.delete("/v1/repos/acme/math/versions/3").status_code == 200
    assert client.get("/v1/repos/acme/math/versions/latest").json()["number"] == 2
    # numbers are never reused
    assert push(client, delta_blobs[3]).json()["number"] == 4
    events = client.get("/v1/audit", params={"target": "acme/math"}).json()["items"]
    assert [e["action"] for e in events][:4] == ["push", "delete_version", "untag", "tag"]


def test_download_has_length_etag_and_ranges(client, delta_blobs, base_fingerprint):
    setup_repo(client, base_fingerprint)
    a = delta_blobs[0]
    assert push(client, a).status_code == 201
    url = "/v1/repos/acme/math/versions/latest/download"
    r = client.get(url)
    assert r.status_code == 200
    assert r.headers["content-length"] == str(a.size)
    assert r.headers["etag"] == f'"{a.digest}"'
    assert r.headers["x-deltastore-raw-digest"] == a.raw_digest
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() == a.digest
    out = io.BytesIO()
    n, raw_digest = decompress_stream(
        io.BytesIO(r.content), out, max_output_size=a.raw_size, expected_raw_digest=a.raw_digest
    )
    assert out.getvalue() == a.raw_path.read_bytes()

    r = client.get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == a.data[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{a.size}"
    r = client.get(url, headers={"Range": f"bytes={a.size - 7}-"})
    assert r.status_code == 206 and r.content == a.data[-7:]
    assert client.get(url, headers={"Range": f"bytes={a.size + 10}-"}).status_code == 416
    assert client.get(url, headers={"If-None-Match": f'"{a.digest}"'}).status_code == 304
    head = client.head(url)
    assert head.status_code == 200 and head.headers["content-length"] == str(a.size) and head.content == b""


def test_repositories_paginate_search_and_list_per_base(client, base_fingerprint):
    setup_repo(client, base_fingerprint, "acme/r0")
    for i in range(1, 7):
        assert (
            client.post(
                "/v1/repos", json={"namespace": "acme", "name": f"r{i}", "base": BASE_NAME}
            ).status_code
            == 201
        )
    client.post("/v1/bases", json={"name": "org/other", "fingerprint": "sha256:" + "cd" * 32})
    client.post("/v1/repos", json={"namespace": "zeta", "name": "solo", "base": "org/other"})
    seen, cursor, pages = [], None, 0
    while True:
        page = client.get("/v1/bases/org/base/repos", params={"limit": 3, "cursor": cursor}).json()
        seen += [r["full_name"] for r in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == [f"acme/r{i}" for i in range(7)]
    assert [r["full_name"] for r in client.get("/v1/repos", params={"q": "sol"}).json()["items"]] == [
        "zeta/solo"
    ]
    assert [
        r["full_name"] for r in client.get("/v1/repos", params={"base": "org/other"}).json()["items"]
    ] == ["zeta/solo"]
    assert client.get("/v1/repos", params={"q": "%"}).json()["items"] == []
    assert client.get("/v1/repos", params={"cursor": "not-a-cursor"}).status_code == 400
    assert (
        client.post("/v1/repos", json={"namespace": "acme", "name": "r1", "base": BASE_NAME}).status_code
        == 409
    )
    assert (
        client.post("/v1/repos", json={"namespace": "acme", "name": "x", "base": "org/none"}).status_code
        == 404
    )
    r = client.post("/v1/bases", json={"name": BASE_NAME, "fingerprint": "sha256:" + "ee" * 32})
    assert r.status_code == 409 and base_fingerprint in error_of(r)["message"]
