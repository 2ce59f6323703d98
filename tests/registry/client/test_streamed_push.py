"""The streamed push end to end, against the registry under uvicorn on 127.0.0.1 with the local
store and with moto's S3 server: the storage form is made, hashed and sent in one pass, round
trips bit-exact, a second push of the same file sends nothing, bytes the registry holds are
stored once, and parts that are not the bytes `complete` names are refused with nothing visible."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from registry.client.api import RegistryApi
from registry.client.transfer import StorageForm
from registry.common.errors import InvalidUploadError
from tests.registry.conftest import TEST_PART
from tests.registry.helpers import error_of, setup_repo
from tests.support.harness import part_targets, streamed_upload


@pytest.fixture(params=["local", "s3"])
def store(request, s3_store) -> dict:
    return {} if request.param == "local" else s3_store


def _blob_keys(s3_client, bucket: str) -> list[str]:
    objects = s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return sorted(o["Key"] for o in objects if "/blobs/" in o["Key"])


def test_a_streamed_push_round_trips_bit_exact(live_server, store, delta_blobs, base_fingerprint, tmp_path):
    server = live_server(**store)
    a = delta_blobs[0]
    with server.client() as admin:
        setup_repo(admin, base_fingerprint)
    with RegistryApi(server.url, home=tmp_path / "home") as api:
        pushed = api.push(a.raw_path, "acme/math")
        assert not pushed.deduplicated and not pushed.resumed and pushed.skipped_parts == 0
        assert pushed.sent_bytes == a.size
        # the same storage form `codec.storage.compress_blob` writes: the same digests
        assert (pushed.version.digest, pushed.version.size) == (a.digest, a.size)
        pulled = api.pull("acme/math")
    assert pulled.path.read_bytes() == a.raw_path.read_bytes()


def test_a_second_push_of_the_same_file_sends_nothing(
    live_server, store, delta_blobs, base_fingerprint, tmp_path, monkeypatch
):
    server = live_server(**store)
    a = delta_blobs[1]
    with server.client() as admin:
        setup_repo(admin, base_fingerprint)
    with RegistryApi(server.url, home=tmp_path / "home") as api:
        api.push(a.raw_path, "acme/math")

        def no_bytes(*args, **kwargs):
            raise AssertionError("a push of bytes the registry holds sends none")

        monkeypatch.setattr(httpx.Client, "put", no_bytes)
        again = api.push(a.raw_path, "acme/math")
    assert again.deduplicated and again.sent_bytes == 0 and again.version.number == 2
    assert again.version.digest == a.digest


def test_bytes_the_registry_holds_pushed_from_a_fresh_cache_are_stored_once(
    live_server, s3_store, s3_client, s3_bucket, delta_blobs, base_fingerprint, tmp_path
):
    """A fresh cache knows no digests to declare: the bytes go up again, and the copy is
    dropped at `complete`, the version pointing at the blob stored first."""
    server = live_server(**s3_store)
    a = delta_blobs[2]
    with server.client() as admin:
        setup_repo(admin, base_fingerprint)
    with RegistryApi(server.url, home=tmp_path / "one") as api:
        first = api.push(a.raw_path, "acme/math")
    keys = _blob_keys(s3_client, s3_bucket)
    with RegistryApi(server.url, home=tmp_path / "two") as api:
        second = api.push(a.raw_path, "acme/math")
        assert not second.deduplicated and second.sent_bytes == a.size
        assert second.version.digest == first.version.digest and second.version.number == 2
        assert api.pull("acme/math").path.read_bytes() == a.raw_path.read_bytes()
    assert _blob_keys(s3_client, s3_bucket) == keys and len(keys) == 1


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("fault", ["corrupted", "truncated", "reordered"])
def test_parts_that_are_not_the_named_bytes_are_refused_at_complete(
    live_server, s3_store, s3_client, s3_bucket, delta_blobs, base_fingerprint, fault
):
    server = live_server(**s3_store)
    a = delta_blobs[0]
    with server.client() as client:
        setup_repo(client, base_fingerprint)
        upload = streamed_upload(client, a.raw_size, TEST_PART)
        parts = [a.data[offset : offset + size] for _, offset, size in part_targets(client, upload, a.size)]
        assert len(parts) >= 3
        if fault == "corrupted":
            parts[1] = parts[1][:100] + bytes([parts[1][100] ^ 0x01]) + parts[1][101:]
        elif fault == "truncated":
            parts[-1] = parts[-1][:-1]
        else:
            parts[1], parts[2] = parts[2], parts[1]
        for (url, _, _), data in zip(part_targets(client, upload, a.size), parts, strict=True):
            assert httpx.put(url, content=data).status_code == 200
        r = client.post(upload["complete_url"], json=a.declaration())
        sent = b"".join(parts)
        if fault == "truncated":
            assert r.status_code == 422 and error_of(r) == {
                "code": "size_mismatch",
                "message": f"received {a.size - 1} bytes but the upload declared {a.size}",
            }
        else:
            assert r.status_code == 422 and error_of(r) == {
                "code": "digest_mismatch",
                "message": f"received bytes have digest {_sha(sent)}, but the upload declared {a.digest}",
            }
        assert client.get("/v1/repos/acme/math/versions").json()["items"] == []
        assert client.get("/v1/repos/acme/math/versions/latest").status_code == 404
        assert client.post(upload["complete_url"], json=a.declaration()).status_code == 404  # dropped
    assert _blob_keys(s3_client, s3_bucket) == []
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_a_truncated_body_through_the_registry_is_refused_as_it_ends(
    live_server, delta_blobs, base_fingerprint
):
    server = live_server()
    a = delta_blobs[0]
    with server.client() as client:
        setup_repo(client, base_fingerprint)
        upload = client.post("/v1/repos/acme/math/uploads", json={"raw_size": a.raw_size}).json()
        r = client.put(upload["upload_url"], content=iter([a.data[:-10]]))
        assert r.status_code == 422 and error_of(r) == {
            "code": "invalid_delta",
            "message": f"upload is not a zstd-compressed delta: blob is not exactly one zstd frame of "
            f"{a.raw_size} bytes",
        }
        assert client.post(upload["complete_url"], json=a.declaration()).status_code == 404
        assert client.get("/v1/repos/acme/math/versions").json()["items"] == []


def test_part_urls_end_where_the_raw_size_can_compress_to(
    live_server, s3_store, delta_blobs, base_fingerprint
):
    server = live_server(**s3_store)
    a = delta_blobs[0]
    with server.client() as client:
        setup_repo(client, base_fingerprint)
        upload = streamed_upload(client, a.raw_size, TEST_PART)
        # stored_size_bound(raw_size) / TEST_PART, rounded up
        most = -(-(a.raw_size + (a.raw_size >> 8) + 22) // TEST_PART)
        r = client.get(upload["parts_url"], params={"first": 1, "count": 100})
        assert r.status_code == 200 and [p["number"] for p in r.json()["parts"]] == list(range(1, most + 1))
        r = client.get(upload["parts_url"], params={"first": most + 1, "count": 1})
        assert r.status_code == 413 and error_of(r)["code"] == "too_large"
        assert error_of(r)["message"].startswith(f"part {most + 1} would begin past byte ")


def test_a_push_the_registry_refuses_as_the_bytes_arrive_forgets_its_upload(
    live_server, delta_blobs, base_fingerprint, tmp_path, monkeypatch
):
    """A delta of another base never leaves the client (it checks first); bytes the registry
    refuses mid-stream (here: not a delta, past the client's own checks) drop the upload, and the
    next push starts a new one."""
    server = live_server()
    a = delta_blobs[0]
    with server.client() as admin:
        setup_repo(admin, base_fingerprint)
    with RegistryApi(server.url, home=tmp_path / "home") as api:
        real_parts = StorageForm.parts

        def garbage_parts(self):
            for part in real_parts(self):
                yield b"\0" * len(part)

        monkeypatch.setattr(StorageForm, "parts", garbage_parts)
        with pytest.raises(InvalidUploadError) as refused:
            api.push(a.raw_path, "acme/math")
        assert (
            str(refused.value) == "upload is not a zstd-compressed delta: not a zstd frame (bad magic number)"
        )
        monkeypatch.setattr(StorageForm, "parts", real_parts)
        pushed = api.push(a.raw_path, "acme/math")
        assert not pushed.resumed and pushed.version.number == 1


def test_parts_reported_at_complete_are_checked_by_the_store(
    live_server, s3_store, s3_client, s3_bucket, delta_blobs, base_fingerprint
):
    """`complete` may report each part's ETag: the registry compares them with the part objects
    it read and verified, refuses a part it did not read so, and the upload stays pending for a
    correct report (verified again by a pass run at that `complete`)."""
    server = live_server(**s3_store)
    a = delta_blobs[0]
    with server.client() as client:
        setup_repo(client, base_fingerprint)
        upload = streamed_upload(client, a.raw_size, TEST_PART)
        etags = []
        for url, offset, size in part_targets(client, upload, a.size):
            r = httpx.put(url, content=a.data[offset : offset + size])
            assert r.status_code == 200
            etags.append(r.headers["etag"])
        reported = [{"number": n, "etag": etag} for n, etag in enumerate(etags, start=1)]
        wrong = [*reported[:1], {"number": 2, "etag": '"' + "0" * 32 + '"'}, *reported[2:]]
        r = client.post(upload["complete_url"], json={**a.declaration(), "parts": wrong})
        assert r.status_code == 409 and error_of(r)["code"] == "conflict"
        assert error_of(r)["message"] == (
            f"the blob store does not hold the parts of upload {upload['id']} as reported (part 2: "
            f"reported ETag {wrong[1]['etag']}, the store holds {etags[1]}); upload them again"
        )
        r = client.post(upload["complete_url"], json={**a.declaration(), "parts": reported[1:]})
        assert r.status_code == 409 and error_of(r)["message"] == (
            f"upload {upload['id']} has {len(etags)} part(s) for the size `complete` names; it reports "
            f"parts {', '.join(str(n) for n in range(2, len(etags) + 1))}"
        )
        assert client.get("/v1/repos/acme/math/versions").json()["items"] == []
        r = client.post(upload["complete_url"], json={**a.declaration(), "parts": reported})
        assert r.status_code == 201 and r.json()["digest"] == a.digest
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
