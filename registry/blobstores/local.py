"""Local filesystem blob store: `blobs/sha256/ab/<hex>` and `staging/<upload id>` under a root.
Every file is written to a temporary name, fsynced and renamed, so readers never see a partial blob."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import uuid
from pathlib import Path
from typing import IO, Iterator

from ..errors import BlobStoreError, ConflictError
from .base import BlobStore, Download, StagedBlob, StoredObject, UploadTarget, digest_hex

_CLAIMED = ".claimed"


def _no_bytes(upload_id: str) -> ConflictError:
    return ConflictError(f"no bytes were received for upload {upload_id}; send them before completing")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mtime(path: Path) -> dt.datetime:
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc)


class LocalBlobStore(BlobStore):
    kind = "local"

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.blob_dir = self.root / "sha256"
        self.staging_dir = self.root / "staging"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        hexd = digest_hex(digest)
        return self.blob_dir / hexd[:2] / hexd

    def _staged_path(self, upload_id: str) -> Path:
        if not upload_id.isalnum():
            raise ValueError(f"bad upload id {upload_id!r}")
        return self.staging_dir / upload_id

    # --- uploads ---------------------------------------------------------------------------
    def begin_upload(self, upload_id: str, size: int) -> UploadTarget:
        return UploadTarget(method="stream")

    @contextlib.contextmanager
    def staging_writer(self, upload_id: str) -> Iterator[IO[bytes]]:
        final = self._staged_path(upload_id)
        tmp = final.with_name(f"{upload_id}.{uuid.uuid4().hex}.part")
        try:
            with open(tmp, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)  # a second PUT of the same upload replaces the first whole
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def open_staged(self, upload_id: str) -> Iterator[StagedBlob]:
        path = self._staged_path(upload_id)
        claimed = path.with_name(upload_id + _CLAIMED)
        try:
            # Claiming by rename means a concurrent PUT can no longer change what is verified.
            os.replace(path, claimed)
        except FileNotFoundError:
            if not claimed.exists():
                raise _no_bytes(upload_id) from None
        with open(claimed, "rb") as fh:
            yield StagedBlob(stream=fh, size=os.fstat(fh.fileno()).st_size, token=str(claimed))

    def promote(self, upload_id: str, digest: str, token: str) -> None:
        claimed = Path(token)
        if claimed.parent != self.staging_dir:
            raise ValueError("staging token does not belong to this store")
        dst = self.blob_path(digest)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(claimed, dst)  # fsynced when written; identical bytes if dst already exists
        except FileNotFoundError:
            raise ConflictError(f"upload {upload_id} was completed or aborted concurrently") from None
        os.utime(dst)  # GC's grace period counts from promotion, not from when the bytes arrived
        _fsync_dir(dst.parent)

    def discard(self, upload_id: str, store_upload_id: str | None = None) -> None:
        for path in self.staging_dir.glob(f"{upload_id}*"):
            path.unlink(missing_ok=True)

    # --- blobs -----------------------------------------------------------------------------
    def exists(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    @contextlib.contextmanager
    def open_blob(self, digest: str) -> Iterator[IO[bytes]]:
        try:
            fh = open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise BlobStoreError(f"blob {digest} is missing from the store") from None
        with fh:
            yield fh

    def download(self, digest: str, *, filename: str) -> Download:
        path = self.blob_path(digest)
        if not path.is_file():
            raise BlobStoreError(f"blob {digest} is missing from the store")
        return Download(path=path)

    def delete(self, digest: str) -> None:
        self.blob_path(digest).unlink(missing_ok=True)

    def list_blobs(self) -> Iterator[StoredObject]:
        for path in self.blob_dir.glob("??/*"):
            if len(path.name) == 64:
                yield StoredObject(name="sha256:" + path.name, modified=_mtime(path))

    def list_staged(self) -> Iterator[StoredObject]:
        for path in self.staging_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                yield StoredObject(name=path.name.split(".", 1)[0], modified=_mtime(path))

    def check(self) -> None:
        probe = self.staging_dir / f".probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise BlobStoreError(f"blob directory {self.root} is not writable: {exc.strerror or exc}") from None
