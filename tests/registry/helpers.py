"""Test helpers: real delta blobs and a push over the HTTP protocol (the registry under uvicorn
on loopback is `tests.support.live_registry.LiveServer`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from codec.compress import CompressOptions, compress
from codec.storage import compress_blob
from tests.support import harness

BASE_NAME = "org/base"


@dataclass(frozen=True)
class DeltaBlob:
    path: Path  # the zstd storage form
    raw_path: Path  # the .bdelta
    digest: str
    size: int
    raw_digest: str
    raw_size: int
    base_fingerprint: str

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()

    def declaration(self, **overrides) -> dict:
        return {
            "digest": self.digest,
            "size": self.size,
            "raw_digest": self.raw_digest,
            "raw_size": self.raw_size,
            **overrides,
        }


def make_delta_blobs(base_dir: Path, ft_dir: Path, out: Path, *, count: int) -> list[DeltaBlob]:
    blobs = []
    for i in range(count):
        raw = out / f"delta{i}.bdelta"
        report = compress(
            base_dir, ft_dir, raw, CompressOptions(base_name=BASE_NAME), extra_metadata={"x-variant": str(i)}
        )
        info = compress_blob(raw, out / f"delta{i}.bdelta.zst")
        blobs.append(
            DeltaBlob(
                out / f"delta{i}.bdelta.zst",
                raw,
                info.digest,
                info.size,
                info.raw_digest,
                info.raw_size,
                report.base_fingerprint,
            )
        )
    return blobs


def error_of(response: httpx.Response) -> dict:
    """The API's error body, checked for its shape."""
    body = response.json()
    assert set(body) >= {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def setup_repo(
    client, fingerprint: str, repo: str = "acme/math", *, base: str = BASE_NAME, headers=None, **extra
) -> None:
    r = client.post("/v1/bases", json={"name": base, "fingerprint": fingerprint}, headers=headers)
    assert r.status_code in (200, 201), r.text
    ns, name = repo.split("/")
    r = client.post("/v1/repos", json={"namespace": ns, "name": name, "base": base, **extra}, headers=headers)
    assert r.status_code == 201, r.text


def send_bytes(client, upload: dict, data: bytes, *, headers=None) -> None:
    """Send an upload's bytes wherever the registry said: through it, one presigned PUT, or parts
    (their URLs asked for in batches); every request must succeed."""
    failed = harness.send_bytes(client, upload, data, headers=headers)
    assert failed is None, failed.text


def push(
    client, blob: DeltaBlob, repo: str = "acme/math", *, headers=None, data: bytes | None = None, **declared
) -> httpx.Response:
    """The whole two-phase push; returns the response of `complete` (or of the failing step)."""
    r = client.post(f"/v1/repos/{repo}/uploads", json=blob.declaration(**declared), headers=headers)
    if r.status_code != 201:
        return r
    upload = r.json()
    failed = harness.send_bytes(client, upload, blob.data if data is None else data, headers=headers)
    if failed is not None:  # refused as the bytes arrived (through the registry)
        return failed
    return client.post(upload["complete_url"], headers=headers)
