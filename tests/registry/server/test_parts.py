"""Parts of an S3 push verified as they arrive (registry.server.parts), against the registry
under uvicorn on 127.0.0.1 and real S3 servers (moto; s3rver where marked): the registry reads and
assembles each part before `complete`, stores exactly the bytes it verified, refuses a part larger
than the part size, and a replica that never saw the parts arrive verifies them itself."""

from __future__ import annotations

import hashlib
import time

import httpx
import pytest

from tests.registry.conftest import S3_SERVERS, TEST_PART
from tests.registry.helpers import error_of, setup_repo
from tests.support.harness import part_targets, streamed_upload


def _send_parts(client: httpx.Client, upload: dict, data: bytes) -> list[str]:
    etags = []
    for url, offset, size in part_targets(client, upload, len(data)):
        r = httpx.put(url, content=data[offset : offset + size])
        assert r.status_code == 200, r.text
        etags.append(r.headers["etag"])
    return etags


def _assembled_parts(s3_client, bucket: str) -> list[int]:
    """Part numbers the blob's multipart upload holds (moto: ListParts)."""
    [mpu] = s3_client.list_multipart_uploads(Bucket=bucket)["Uploads"]
    parts = s3_client.list_parts(Bucket=bucket, Key=mpu["Key"], UploadId=mpu["UploadId"]).get("Parts", [])
    return [p["PartNumber"] for p in parts]


def _wait_for_assembly(s3_client, bucket: str, count: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while (numbers := _assembled_parts(s3_client, bucket)) != list(range(1, count + 1)):
        assert time.monotonic() < deadline, f"assembled only parts {numbers} of {count}"
        time.sleep(0.05)
    return numbers


def _download(client: httpx.Client) -> bytes:
    location = client.get("/v1/repos/acme/math/versions/latest/download", follow_redirects=False)
    return httpx.get(location.headers["location"]).content


def test_parts_are_verified_and_assembled_before_complete(
    live_server, s3_store, s3_client, s3_bucket, delta_blobs, base_fingerprint
):
    """Before `complete` is sent, the registry has read every part but the last (whose size only
    `complete` fixes) and added it to the blob's multipart upload: `complete` finishes what is
    left, and leaves no part object behind."""
    server = live_server(**s3_store)
    a = delta_blobs[0]
    with server.client() as client:
        setup_repo(client, base_fingerprint)
        upload = streamed_upload(client, a.raw_size, TEST_PART)
        etags = _send_parts(client, upload, a.data)
        assert len(etags) >= 3
        _wait_for_assembly(s3_client, s3_bucket, len(etags) - 1)
        time.sleep(0.5)
        assert _assembled_parts(s3_client, s3_bucket) == list(range(1, len(etags)))  # not the last
        assert client.get("/v1/repos/acme/math/versions").json()["items"] == []  # nothing visible yet
        r = client.post(upload["complete_url"], json=a.declaration())
        assert r.status_code == 201 and r.json()["digest"] == a.digest, r.text
        assert hashlib.sha256(_download(client)).hexdigest() == a.digest.removeprefix("sha256:")
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert [k for k in keys if "/parts/" in k] == [] and len([k for k in keys if "/blobs/" in k]) == 1


def test_what_is_stored_is_the_bytes_verified_not_a_later_put(
    live_server, s3_store, s3_client, s3_bucket, delta_blobs, base_fingerprint
):
    """A part PUT again with other bytes after the registry read it changes nothing: the blob is
    assembled from the bytes that were verified, never copied from the part's key."""
    server = live_server(**s3_store)
    a = delta_blobs[1]
    with server.client() as client:
        setup_repo(client, base_fingerprint)
        upload = streamed_upload(client, a.raw_size, TEST_PART)
        etags = _send_parts(client, upload, a.data)
        _wait_for_assembly(s3_client, s3_bucket, len(etags) - 1)
        [(url, offset, size), *_] = part_targets(client, upload, a.size)
        assert httpx.put(url, content=b"\xff" * size).status_code == 200  # part 1 replaced
        r = client.post(upload["complete_url"], json=a.declaration())
        assert r.status_code == 201, r.text
        assert _download(client) == a.data


@pytest.mark.parametrize("s3_endpoint", S3_SERVERS, indirect=True)
def test_a_part_larger_than_the_part_size_is_refused(
    live_server, s3_store, s3_client, s3_bucket, delta_blobs, base_fingerprint
):
    server = live_server(**s3_store)
    a = delta_blobs[2]
    with server.client() as client:
        setup_repo(client, base_fingerprint)
        upload = streamed_upload(client, a.raw_size, TEST_PART)
        [(url, _, _), *_] = part_targets(client, upload, a.size)
        assert httpx.put(url, content=a.data[: TEST_PART + 1]).status_code == 200
        r = client.post(upload["complete_url"], json=a.declaration())
        assert r.status_code == 422 and error_of(r)["code"] == "size_mismatch", r.text
        assert error_of(r)["message"] == (
            f"part 1 of upload {upload['id']} has more than the upload's part size of {TEST_PART} bytes "
            "(every part but the last has exactly that size)"
        )
        assert client.get(f"/v1/uploads/{upload['id']}").status_code == 404  # dropped with its bytes
        assert client.get("/v1/repos/acme/math/versions").json()["items"] == []
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert keys == []


@pytest.mark.parametrize("s3_endpoint", S3_SERVERS, indirect=True)
def test_a_replica_that_did_not_see_the_parts_arrive_verifies_them_itself(
    live_server, s3_store, s3_client, s3_bucket, delta_blobs, base_fingerprint
):
    """The upload is created on one replica (whose pass reads the parts) and completed on
    another, which has no pass for it: it reads the parts itself, publishes the exact bytes,
    and refuses parts that are not the bytes named."""
    first = live_server(**s3_store)
    second = live_server(**s3_store)
    good, bad = delta_blobs[3], delta_blobs[4]
    with first.client() as one, second.client() as two:
        setup_repo(one, base_fingerprint)
        upload = streamed_upload(one, good.raw_size, TEST_PART)
        _send_parts(one, upload, good.data)
        r = two.post(upload["complete_url"], json=good.declaration())
        assert r.status_code == 201 and r.json()["digest"] == good.digest, r.text
        assert _download(two) == good.data

        upload = streamed_upload(one, bad.raw_size, TEST_PART)
        data = bytearray(bad.data)
        data[len(data) // 2] ^= 0xFF
        _send_parts(one, upload, bytes(data))
        r = two.post(upload["complete_url"], json=bad.declaration())
        assert r.status_code == 422 and error_of(r)["code"] == "digest_mismatch", r.text
        assert [v["number"] for v in one.get("/v1/repos/acme/math/versions").json()["items"]] == [1]


@pytest.mark.parametrize("s3_endpoint", S3_SERVERS, indirect=True)
def test_complete_before_every_part_arrived_is_a_conflict_and_the_upload_stays(
    live_server, s3_store, delta_blobs, base_fingerprint
):
    server = live_server(**s3_store)
    a = delta_blobs[5]
    with server.client() as client:
        setup_repo(client, base_fingerprint)
        upload = streamed_upload(client, a.raw_size, TEST_PART)
        targets = part_targets(client, upload, a.size)
        for url, offset, size in targets[:-1]:
            assert httpx.put(url, content=a.data[offset : offset + size]).status_code == 200
        r = client.post(upload["complete_url"], json=a.declaration())
        assert r.status_code == 409 and error_of(r)["message"] == (
            f"upload {upload['id']} is missing part {len(targets)} of {len(targets)}; "
            "upload every part before completing"
        )
        url, offset, size = targets[-1]
        assert httpx.put(url, content=a.data[offset : offset + size]).status_code == 200
        r = client.post(upload["complete_url"], json=a.declaration())
        assert r.status_code == 201 and r.json()["digest"] == a.digest, r.text


def test_with_no_pass_free_the_parts_are_verified_at_complete(
    live_server, s3_store, s3_client, s3_bucket, delta_blobs, base_fingerprint
):
    """`part_checks=0`: nothing reads the parts as they arrive; `complete` reads them itself."""
    server = live_server(**s3_store, part_checks=0)
    a = delta_blobs[6]
    with server.client() as client:
        setup_repo(client, base_fingerprint)
        upload = streamed_upload(client, a.raw_size, TEST_PART)
        _send_parts(client, upload, a.data)
        time.sleep(1)
        assert _assembled_parts(s3_client, s3_bucket) == []
        r = client.post(upload["complete_url"], json=a.declaration())
        assert r.status_code == 201 and r.json()["digest"] == a.digest, r.text
        assert _download(client) == a.data


def test_an_aborted_upload_leaves_no_part_behind(
    live_server, s3_store, s3_client, s3_bucket, delta_blobs, base_fingerprint
):
    server = live_server(**s3_store)
    a = delta_blobs[7]
    with server.client() as client:
        setup_repo(client, base_fingerprint)
        upload = streamed_upload(client, a.raw_size, TEST_PART)
        etags = _send_parts(client, upload, a.data)
        _wait_for_assembly(s3_client, s3_bucket, len(etags) - 1)
        assert client.delete(f"/v1/uploads/{upload['id']}").status_code == 204
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", []) == []
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


@pytest.mark.parametrize("s3_endpoint", ["s3rver"], indirect=True)
def test_a_part_still_being_written_is_not_read_before_it_is_whole(
    live_server, s3_store, delta_blobs, base_fingerprint
):
    """s3rver shows an object while its PUT is still writing it (its size so far, even the final
    ETag): the pass waits until a part has the size it must have, so a slow PUT of part 1 is read
    whole and the push publishes."""
    server = live_server(**s3_store)
    a = delta_blobs[0]
    with server.client() as client:
        setup_repo(client, base_fingerprint)
        upload = streamed_upload(client, a.raw_size, TEST_PART)
        (url, offset, size), *rest = part_targets(client, upload, a.size)
        body = a.data[offset : offset + size]

        def slowly():
            yield body[: size // 2]
            time.sleep(1.5)  # the pass polls meanwhile and sees half a part
            yield body[size // 2 :]

        r = httpx.put(url, content=slowly(), headers={"Content-Length": str(size)}, timeout=30)
        assert r.status_code == 200, r.text
        for url, offset, size in rest:
            assert httpx.put(url, content=a.data[offset : offset + size]).status_code == 200
        r = client.post(upload["complete_url"], json=a.declaration())
        assert r.status_code == 201 and r.json()["digest"] == a.digest, r.text
        assert _download(client) == a.data
