"""The blob store interface. Bytes of an upload land in a staging object named by the upload id;
once verified they are promoted to the blob's key, which is derived from its digest alone."""

from __future__ import annotations

import contextlib
import datetime as dt
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from ..names import DIGEST_RE


def digest_hex(digest: str) -> str:
    """`sha256:<hex>` -> `<hex>`, refusing anything else (keys are built from it)."""
    if not DIGEST_RE.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest.removeprefix("sha256:")


@dataclass(frozen=True)
class UploadPart:
    number: int
    url: str
    offset: int
    size: int


@dataclass(frozen=True)
class UploadTarget:
    """Where the client sends the bytes: through the server (`stream`), one presigned PUT
    (`s3-put`), or presigned part PUTs of a multipart upload (`s3-multipart`)."""

    method: str
    url: str | None = None
    parts: list[UploadPart] = field(default_factory=list)
    part_size: int | None = None
    store_upload_id: str | None = None


@dataclass(frozen=True)
class Download:
    """How to serve a blob: redirect to `url`, or stream the local file at `path`."""

    url: str | None = None
    path: Path | None = None


@dataclass(frozen=True)
class StagedBlob:
    """The received bytes of one upload, claimed for verification. `token` pins the exact
    object read (S3 ETag) so promotion copies those bytes and no later overwrite."""

    stream: IO[bytes]
    size: int
    token: str


@dataclass(frozen=True)
class StoredObject:
    name: str  # a digest (blobs) or an upload id (staging)
    modified: dt.datetime


class BlobStore(ABC):
    kind: str

    # --- uploads ---------------------------------------------------------------------------
    @abstractmethod
    def begin_upload(self, upload_id: str, size: int) -> UploadTarget: ...

    def staging_writer(self, upload_id: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A file to stream the upload's bytes into (stores whose bytes pass through the server)."""
        raise NotImplementedError(f"{self.kind} store takes uploads directly, not through the server")

    def finish_parts(self, upload_id: str, store_upload_id: str, *, expected_parts: int) -> None:
        """Assemble the parts of a multipart upload (stores that have them)."""

    @abstractmethod
    def open_staged(self, upload_id: str) -> contextlib.AbstractContextManager[StagedBlob]:
        """Claim and open the upload's received bytes; ConflictError if none arrived."""

    @abstractmethod
    def promote(self, upload_id: str, digest: str, token: str) -> None:
        """Make the verified staged bytes the blob `digest` and drop the staging object."""

    @abstractmethod
    def discard(self, upload_id: str, store_upload_id: str | None = None) -> None:
        """Remove whatever an upload left behind (staging object, unfinished multipart upload)."""

    # --- blobs -----------------------------------------------------------------------------
    @abstractmethod
    def exists(self, digest: str) -> bool: ...

    @abstractmethod
    def open_blob(self, digest: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...

    @abstractmethod
    def download(self, digest: str, *, filename: str) -> Download: ...

    @abstractmethod
    def delete(self, digest: str) -> None: ...

    @abstractmethod
    def list_blobs(self) -> Iterator[StoredObject]: ...

    @abstractmethod
    def list_staged(self) -> Iterator[StoredObject]: ...

    @abstractmethod
    def check(self) -> None:
        """Raise BlobStoreError unless the store is reachable and writable."""
