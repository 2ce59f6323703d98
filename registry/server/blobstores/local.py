"""Local filesystem blob store: blobs at `sha256/ab/<hex>` and uploads at
`staging/<upload id>.<token>` under a root (one file per PUT, verified as it is written; the
upload's row names the token of the one that passed). Blobs are fsynced files renamed into
place, so readers never see a partial blob."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from registry.common.errors import BlobStoreError, ConflictError, StorageFullError
from registry.server.blobstores.base import (
    BlobStore,
    Download,
    StagedBlob,
    StoredObject,
    UploadRef,
    UploadTarget,
    check_upload_id,
    digest_hex,
)

log = logging.getLogger("deltastore.registry")
_PROMOTED = "promoted"
_HEX64 = re.compile(r"[0-9a-f]{64}")


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

    @staticmethod
    def blob_key(digest: str) -> str:
        hexd = digest_hex(digest)
        return f"sha256/{hexd[:2]}/{hexd}"

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "sha256" or self.blob_key("sha256:" + parts[2]) != key:
            raise ValueError(f"not a blob key of this store: {key!r}")
        return self.root / key

    def _staged_path(self, upload_id: str) -> Path:
        return self.staging_dir / check_upload_id(upload_id)

    # --- uploads ---------------------------------------------------------------------------
    def begin_upload(self, upload_id: str, max_size: int) -> UploadTarget:
        return UploadTarget(method="stream")

    def _token_path(self, upload_id: str, token: str) -> Path:
        if not (token.isascii() and token.isalnum()):
            raise ValueError(f"bad staging token {token!r}")
        return self.staging_dir / f"{check_upload_id(upload_id)}.{token}"

    @contextlib.contextmanager
    def staging_writer(self, upload_id: str) -> Iterator[tuple[IO[bytes], str]]:
        token = uuid.uuid4().hex
        path = self._token_path(upload_id, token)
        try:
            # A fresh file per PUT: a concurrent or repeated PUT of the same upload never changes
            # the bytes another one verified.
            with open(path, "xb") as fh:
                yield fh, token
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            path.unlink(missing_ok=True)  # no partial bytes stay behind, and their space is freed
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.error("blob store %s is full (upload %s refused)", self.root, upload_id)
                raise StorageFullError(
                    "the blob store is full; nothing was stored (free space, then push again)"
                ) from None
            raise
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def open_staged(self, ref: UploadRef) -> Iterator[StagedBlob]:
        token = ref.token
        try:
            if token is None:
                raise FileNotFoundError
            fh = open(self._token_path(ref.upload_id, token), "rb")
        except FileNotFoundError:
            # Promoted by a `complete` that died before its commit (or that a concurrent one won):
            # the bytes, verified when they arrived, are at their blob key.
            token = _PROMOTED
            try:
                fh = open(self.root / self.blob_key(ref.digest), "rb")
            except FileNotFoundError:  # never sent
                raise _no_bytes(ref.upload_id) from None
        with fh:
            yield StagedBlob(stream=fh, size=os.fstat(fh.fileno()).st_size, token=token)

    def promote(self, ref: UploadRef, token: str) -> str:
        key = self.blob_key(ref.digest)
        if token == _PROMOTED:
            os.utime(self.root / key)  # GC's grace period counts from (re)promotion
            return key
        if token != ref.token:
            raise ValueError("staging token does not belong to this upload")
        dst = self.root / key
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            # fsynced when written; identical bytes if dst exists already
            os.replace(self._token_path(ref.upload_id, token), dst)
        except FileNotFoundError:
            raise ConflictError(f"upload {ref.upload_id} was completed or aborted concurrently") from None
        os.utime(dst)  # GC's grace period counts from promotion, not from when the bytes arrived
        _fsync_dir(dst.parent)
        return key

    def discard(self, ref: UploadRef) -> None:
        for path in self.staging_dir.glob(f"{check_upload_id(ref.upload_id)}.*"):
            path.unlink(missing_ok=True)
        self._staged_path(ref.upload_id).unlink(missing_ok=True)

    def list_staging(self) -> Iterator[StoredObject]:
        for path in list(self.staging_dir.iterdir()):
            upload_id = path.name.split(".", 1)[0]
            if upload_id:  # not a readiness probe
                with contextlib.suppress(FileNotFoundError):
                    yield StoredObject(key=upload_id, modified=_mtime(path))

    def sweep_staging(self, *, live_upload_ids: set[str], older_than: dt.datetime) -> int:
        removed = set()
        for path in list(self.staging_dir.iterdir()):
            upload_id = path.name.split(".", 1)[0]
            with contextlib.suppress(FileNotFoundError):
                if upload_id not in live_upload_ids and _mtime(path) < older_than:
                    path.unlink()
                    removed.add(upload_id)
        return len(removed)

    # --- blobs -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_blob(self, key: str) -> Iterator[IO[bytes]]:
        try:
            fh = open(self._path(key), "rb")
        except FileNotFoundError:
            raise BlobStoreError(f"blob {key} is missing from the store") from None
        with fh:
            yield fh

    def download(self, key: str, *, filename: str) -> Download:
        path = self._path(key)
        if not path.is_file():
            raise BlobStoreError(f"blob {key} is missing from the store")
        return Download(path=path)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list_blobs(self) -> Iterator[StoredObject]:
        for path in self.blob_dir.glob("??/*"):
            if not _HEX64.fullmatch(path.name) or path.parent.name != path.name[:2]:
                continue  # temporary or foreign files are not blobs
            with contextlib.suppress(FileNotFoundError):
                yield StoredObject(key=f"sha256/{path.parent.name}/{path.name}", modified=_mtime(path))

    def check(self) -> None:
        probe = self.staging_dir / f".probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise BlobStoreError(
                f"blob directory {self.root} is not writable: {exc.strerror or exc}"
            ) from None
