"""`deltactl push / pull` through a registry whose blobs live in S3 (moto's server on loopback):
bytes go straight to presigned URLs in many small parts, interrupted transfers resume."""

from __future__ import annotations

import contextlib
import math
from urllib.parse import urlparse

import httpx
import pytest

from cli import errors as exit_codes
from registry.client import pull as pulling
from registry.client import transfer
from registry.client.errors import TransferInterruptedError

from .registry_fixtures import (  # noqa: F401  (fixtures)
    BASE,
    deltactl,
    deltactl_json,
    deltas,
    s3_bucket,
    s3_client,
    s3_endpoint,
    start_registry,
)

PART = 16 * 1024


@pytest.fixture
def s3_registry(start_registry, s3_endpoint, s3_bucket, deltas):
    server = start_registry(
        blob_url=f"s3://{s3_bucket}/registry",
        s3_endpoint_url=s3_endpoint,
        multipart_threshold=PART,
        multipart_part_size=PART,
    )
    assert deltactl("base", "add", BASE, deltas.base_dir).exit_code == 0
    return server


def _blob_objects(s3_client, bucket, kind: str = "blobs") -> list[dict]:
    objects = s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return [o for o in objects if f"/{kind}/" in o["Key"]]


def _part_number(url: str) -> int:
    """The part a presigned part URL (`.../parts/<upload id>/<n>?...`) is for."""
    return int(urlparse(url).path.rsplit("/", 1)[-1])


@pytest.fixture
def sent_parts(monkeypatch) -> list[str]:
    """The URLs every part PUT went to (those that reached the store)."""
    urls: list[str] = []
    real = transfer.put_bytes

    def recording(http, url, *args, **kwargs):
        response = real(http, url, *args, **kwargs)
        urls.append(url)
        return response

    monkeypatch.setattr(transfer, "put_bytes", recording)
    return urls


def test_push_and_pull_go_straight_to_s3_in_parallel_parts(
    s3_registry, deltas, s3_client, s3_bucket, s3_endpoint, sent_parts
):
    pushed = deltactl_json("push", deltas.plain, "acme/math")
    parts = math.ceil(pushed["size"] / PART)
    assert parts >= 10 and len(sent_parts) == parts
    assert all(url.startswith(s3_endpoint) and "/parts/" in urlparse(url).path for url in sent_parts)
    assert sorted(map(_part_number, sent_parts)) == list(range(1, parts + 1))
    [obj] = _blob_objects(s3_client, s3_bucket)
    assert obj["Size"] == pushed["size"] and obj["ETag"].strip('"').endswith(
        f"-{parts}"
    )  # assembled by the registry into a multipart object
    assert _blob_objects(s3_client, s3_bucket, "parts") == []  # the part objects are gone

    pulled = deltactl_json("pull", "acme/math")
    assert not pulled["cache_hit"] and pulled["downloaded_bytes"] == pushed["size"]
    assert open(pulled["path"], "rb").read() == deltas.plain.read_bytes()


def test_an_interrupted_push_resumes_with_the_missing_parts(
    s3_registry, deltas, s3_client, s3_bucket, monkeypatch, sent_parts
):
    monkeypatch.setattr("registry.client.settings.TRANSFER_ATTEMPTS", 2)
    monkeypatch.setenv("DELTACTL_UPLOAD_CONCURRENCY", "1")  # parts in order: exactly four get through
    real = transfer.put_bytes  # the recording wrapper

    class Unreachable:
        def put(self, url, **kwargs):
            for _ in kwargs["content"]:
                break  # some bytes leave before the connection drops
            raise httpx.ConnectError("connection reset by peer")

    def dropping_after_four(http, url, *args, **kwargs):
        return real(http if len(sent_parts) < 4 else Unreachable(), url, *args, **kwargs)

    monkeypatch.setattr(transfer, "put_bytes", dropping_after_four)
    r = deltactl("push", deltas.plain, "acme/math")
    assert r.exit_code == exit_codes.EXIT_NETWORK, r.output
    parts = math.ceil(deltas.plain.stat().st_size / PART)  # at least as many as the stored form has
    assert "push interrupted with 4 parts stored" in r.stderr and "run the same command again" in r.stderr
    stored = _blob_objects(s3_client, s3_bucket, "parts")
    assert sorted(int(o["Key"].rsplit("/", 1)[-1]) for o in stored) == [1, 2, 3, 4]
    assert deltactl_json("show", "acme/math")["versions"] == []

    monkeypatch.setattr(transfer, "put_bytes", real)
    monkeypatch.setenv("DELTACTL_UPLOAD_CONCURRENCY", "4")
    sent_parts.clear()
    resumed = deltactl("push", deltas.plain, "acme/math")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed: 4 part(s) were already stored" in resumed.stdout
    total = math.ceil(deltactl_json("show", "acme/math")["versions"][0]["size"] / PART)
    assert len(sent_parts) == total - 4 and total <= parts
    assert sorted(map(_part_number, sent_parts)) == list(range(5, total + 1))
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert _blob_objects(s3_client, s3_bucket, "parts") == []
    assert open(deltactl_json("pull", "acme/math")["path"], "rb").read() == deltas.plain.read_bytes()


def _cut_downloads(monkeypatch, after: int, times: int) -> list[int]:
    """Make the next `times` downloads lose their connection after `after` bytes; returns the
    offset every download (cut or not) started from."""
    real = pulling.open_download
    offsets: list[int] = []

    @contextlib.contextmanager
    def cut(http, url, offset, size):
        with real(http, url, offset, size) as (chunks, start):
            offsets.append(start)
            if len(offsets) > times:
                yield chunks, start
                return

            def limited():
                left = after
                for chunk in chunks:
                    if len(chunk) >= left:
                        yield chunk[:left]
                        raise TransferInterruptedError("connection lost")
                    left -= len(chunk)
                    yield chunk

            yield limited(), start

    monkeypatch.setattr(pulling, "open_download", cut)
    return offsets


def test_an_interrupted_pull_resumes_with_range(s3_registry, deltas, monkeypatch, isolated_home):
    pushed = deltactl_json("push", deltas.plain, "acme/math")
    monkeypatch.setattr("registry.client.settings.TRANSFER_ATTEMPTS", 1)
    offsets = _cut_downloads(monkeypatch, after=50_000, times=1)
    r = deltactl("pull", "acme/math")
    assert r.exit_code == exit_codes.EXIT_NETWORK and "pull again to resume" in r.stderr
    [partial] = (isolated_home / "blobs").glob("*.zst.incomplete")
    assert partial.stat().st_size == 50_000 and not list((isolated_home / "blobs").glob("*.bdelta"))

    again = deltactl_json("pull", "acme/math")
    assert offsets == [0, 50_000]  # the store honoured the Range request
    assert again["downloaded_bytes"] == pushed["size"] - 50_000
    assert open(again["path"], "rb").read() == deltas.plain.read_bytes()
    assert not partial.exists()


def test_a_pull_retries_a_cut_download_within_one_command(s3_registry, deltas, monkeypatch):
    pushed = deltactl_json("push", deltas.plain, "acme/math")
    offsets = _cut_downloads(monkeypatch, after=30_000, times=2)
    pulled = deltactl_json("pull", "acme/math")
    assert offsets == [0, 30_000, 60_000] and pulled["downloaded_bytes"] == pushed["size"]
    assert open(pulled["path"], "rb").read() == deltas.plain.read_bytes()


def test_a_corrupt_object_in_the_store_is_refused(s3_registry, deltas, s3_client, s3_bucket, isolated_home):
    deltactl_json("push", deltas.plain, "acme/math")
    [obj] = _blob_objects(s3_client, s3_bucket)
    body = bytearray(s3_client.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read())
    body[-100] ^= 0x01
    s3_client.put_object(Bucket=s3_bucket, Key=obj["Key"], Body=bytes(body))
    r = deltactl("pull", "acme/math")
    assert r.exit_code == exit_codes.EXIT_INVALID and r.stderr.startswith("error: corrupt download: ")
    assert not [p for p in (isolated_home / "blobs").iterdir() if not p.name.endswith(".lock")]
