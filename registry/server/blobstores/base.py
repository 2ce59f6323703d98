"""The blob store interface. A blob lives at a key derived from its digest (and, for S3 multipart
uploads, from the server-chosen upload id), never from a user-supplied name; the key is recorded
on the blob's row. Upload bytes arrive at a staging location and become a blob once verified."""

from __future__ import annotations

import contextlib
import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from registry.common.names import DIGEST_RE


def digest_hex(digest: str) -> str:
    """`sha256:<hex>` -> `<hex>`, refusing anything else (keys are built from it)."""
    if not DIGEST_RE.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest.removeprefix("sha256:")


def check_upload_id(upload_id: str) -> str:
    if not (upload_id.isascii() and upload_id.isalnum()):
        raise ValueError(f"bad upload id {upload_id!r}")
    return upload_id


@dataclass(frozen=True)
class UploadRef:
    """What a store needs to find an upload's bytes: its id, its digest (None until `complete`
    names it: blobs are promoted to a key derived from it) and, for S3 multipart uploads, the
    store's own upload id. `token` names the verified staged file of bytes that came through
    the server."""

    upload_id: str
    digest: str | None
    multipart_id: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class UploadPart:
    """Where to PUT part `number` (1-based) of a multipart upload."""

    number: int
    url: str


@dataclass(frozen=True)
class ReceivedPart:
    """A part the store already holds (a resumed upload); `etag` as the store reports it (for S3,
    the quoted MD5 of the part's bytes)."""

    number: int
    size: int
    etag: str


@dataclass(frozen=True)
class FetchedPart:
    """One part of an upload as the registry read it: its bytes and the ETag of the object they
    came from (so that exactly that object is what gets assembled)."""

    number: int
    data: bytes
    etag: str


@dataclass(frozen=True)
class UploadTarget:
    """Where the client sends the bytes: through the server (`stream`), one presigned PUT
    (`s3-put`), or presigned part PUTs of a multipart upload (`s3-multipart`, parts of
    `part_size` bytes but the last, whose URLs are asked for in batches as the client makes
    them; `received` lists those a resumed upload already holds)."""

    method: str
    url: str | None = None
    received: list[ReceivedPart] = field(default_factory=list)
    part_size: int | None = None
    multipart_id: str | None = None


@dataclass(frozen=True)
class Download:
    """How to serve a blob: redirect to `url`, or stream the local file at `path`."""

    url: str | None = None
    path: Path | None = None


@dataclass(frozen=True)
class StagedBlob:
    """The received bytes of one upload, claimed for verification. `token` pins the exact
    object read (S3 ETag), so what gets promoted is what was verified."""

    stream: IO[bytes]
    size: int
    token: str


@dataclass(frozen=True)
class StoredObject:
    key: str
    modified: dt.datetime


class BlobStore(ABC):
    kind: str

    # --- uploads ---------------------------------------------------------------------------
    @abstractmethod
    def begin_upload(self, upload_id: str, max_size: int) -> UploadTarget:
        """Prepare to receive at most `max_size` stored bytes (their exact size may be unknown)."""

    def staging_writer(self, upload_id: str) -> contextlib.AbstractContextManager[tuple[IO[bytes], str]]:
        """A file to stream the upload's bytes into (stores whose bytes pass through the server),
        and the token that names it once it is kept (`UploadRef.token`)."""
        raise NotImplementedError(f"the {self.kind} store takes uploads directly, not through the server")

    def part_urls(self, ref: UploadRef, numbers: range) -> list[UploadPart]:
        """Presigned URLs for the given parts of a multipart upload (stores that have them)."""
        raise NotImplementedError(f"the {self.kind} store has no multipart uploads")

    def resume_upload(self, ref: UploadRef, *, method: str) -> UploadTarget:
        """Where to send the bytes of a pending upload again: a fresh presigned URL and, for
        multipart uploads, which parts already arrived. Bytes through the server start over."""
        return UploadTarget(method=method)

    # Stores with multipart uploads (S3) keep each part as an object of its own, which the
    # registry reads as soon as it exists (registry.server.parts) and assembles into the blob.
    def stored_part_size(self, ref: UploadRef, number: int) -> int | None:
        """The bytes the store shows for part `number` (None: not there), without reading them."""
        raise NotImplementedError(f"the {self.kind} store has no multipart uploads")

    def fetch_part(self, ref: UploadRef, number: int, *, max_bytes: int) -> FetchedPart | None:
        """Part `number`'s bytes (at most `max_bytes` of them), or None while it has not arrived."""
        raise NotImplementedError(f"the {self.kind} store has no multipart uploads")

    def assemble_part(self, ref: UploadRef, part: FetchedPart) -> str:
        """Add a verified part to the upload's blob (invisible until `complete_assembly`);
        returns the ETag the blob's multipart upload knows it by."""
        raise NotImplementedError(f"the {self.kind} store has no multipart uploads")

    def assembled(self, ref: UploadRef) -> bool:
        """Whether the upload's blob was assembled already (by a `complete` whose commit did not
        follow)."""
        return False

    def complete_assembly(self, ref: UploadRef, etags: list[tuple[int, str]]) -> bool:
        """Make the assembled parts, (number, ETag) in order, the blob at its key; False when an
        earlier call did so already."""
        raise NotImplementedError(f"the {self.kind} store has no multipart uploads")

    def drop_parts(self, ref: UploadRef) -> None:
        """Remove the upload's part objects (once its blob is assembled, or it is abandoned)."""
        raise NotImplementedError(f"the {self.kind} store has no multipart uploads")

    @abstractmethod
    def open_staged(self, ref: UploadRef) -> contextlib.AbstractContextManager[StagedBlob]:
        """Claim and open the upload's received bytes; ConflictError if none arrived."""

    @abstractmethod
    def promote(self, ref: UploadRef, token: str) -> str:
        """Make the verified staged bytes a blob; returns the blob's key."""

    @abstractmethod
    def discard(self, ref: UploadRef) -> None:
        """Remove whatever an upload left behind (staged bytes, unfinished multipart upload)."""

    @abstractmethod
    def list_staging(self) -> Iterator[StoredObject]:
        """What uploads left in staging (received bytes, unfinished multipart uploads); `key` is
        the upload id."""

    @abstractmethod
    def sweep_staging(self, *, live_upload_ids: set[str], older_than: dt.datetime) -> int:
        """Remove staging leftovers older than `older_than` of uploads not in `live_upload_ids`."""

    # --- blobs -----------------------------------------------------------------------------
    @abstractmethod
    def open_blob(self, key: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...

    @abstractmethod
    def download(self, key: str, *, filename: str) -> Download: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def list_blobs(self) -> Iterator[StoredObject]: ...

    @abstractmethod
    def check(self) -> None:
        """Raise BlobStoreError unless the store is reachable and writable."""
