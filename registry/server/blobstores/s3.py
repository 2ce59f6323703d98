"""S3 blob store (any S3-compatible endpoint): clients move bytes through presigned URLs, the
server only verifies them.

Keys under the store's prefix, all derived from digests and server-chosen upload ids:
- `uploads/<upload id>`: target of a single presigned PUT; once verified it is copied to
  `blobs/sha256/<hex>` (a PUT URL stays valid until it expires, so the verified bytes must not
  stay where it points).
- `parts/<upload id>/<n>`: part n of a larger upload, an object of its own (presigned PUT), so
  that the registry can read and verify it while the client sends the next ones (no byte of an
  unfinished multipart upload can be read). Each part the registry read and verified becomes the
  same part of a multipart upload at `blobs/uploads/<upload id>` — copied inside the store
  (UploadPartCopy) when the copy's MD5 is that of the bytes verified, else sent from those
  bytes (s3rver has no UploadPartCopy) — which becomes the blob itself at `complete`. No
  presigned URL points at the blob's key, so large blobs are never copied again. (Its key
  cannot name the digest: a streamed push sends its parts before the digest is known. Blobs
  from before streamed pushes are at `blobs/sha256/<hex>.<upload id>`; the blob row records
  each key.)

Request checksums are computed only when an operation requires them, because several
S3-compatible services reject the newer default checksum headers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import math
import re
from collections.abc import Iterator
from typing import IO

import boto3
import urllib3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from registry.common.errors import BlobStoreError, ConflictError
from registry.server.blobstores.base import (
    BlobStore,
    Download,
    FetchedPart,
    ReceivedPart,
    StagedBlob,
    StoredObject,
    UploadPart,
    UploadRef,
    UploadTarget,
    check_upload_id,
    digest_hex,
)

MAX_PARTS = 10_000
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchUpload"}
_PROMOTED = "promoted:"
_BLOB_NAME = re.compile(r"[0-9a-f]{64}(\.[0-9a-zA-Z]+)?")
_UPLOAD_NAME = re.compile(r"[0-9a-f]{32}")
#: Answers of a store that lacks an operation (s3rver has no UploadPartCopy).
_UNSUPPORTED = {"NotImplemented", "MethodNotAllowed", "501", "405"}


def _multipart_upload_id(key: str) -> str:
    """The upload id in a multipart upload's key: `.../blobs/uploads/<id>` (or the older
    `.../blobs/sha256/<hex>.<id>`)."""
    return key.rsplit("/", 1)[-1].rsplit(".", 1)[-1]


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _store_errors(what: str) -> Iterator[None]:
    try:
        yield
    except ClientError as exc:
        message = exc.response.get("Error", {}).get("Message", "")
        raise BlobStoreError(f"S3 {what} failed: {_code(exc)} {message}".strip()) from None
    except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
        # the endpoint unreachable, or gone in the middle of a response
        raise BlobStoreError(f"S3 {what} failed: {exc}") from None


class _GuardedBody:
    """A GetObject body whose read errors (the endpoint going away mid-stream) are BlobStoreErrors,
    so a caller sees a clear 502 instead of a transport exception."""

    def __init__(self, body, what: str):
        self._body, self._what = body, what

    def read(self, n: int = -1) -> bytes:
        with _store_errors(self._what):
            return self._body.read(n)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()


class S3BlobStore(BlobStore):
    kind = "s3"

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        addressing_style: str = "path",
        max_pool_connections: int = 32,
        max_attempts: int = 5,
        presign_ttl: int = 900,
        multipart_threshold: int = 16 << 20,
        part_size: int = 8 << 20,
    ):
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.presign_ttl = presign_ttl
        self.part_copy = True  # UploadPartCopy, until the store answers that it has none
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": addressing_style},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=max_pool_connections,
            retries={"max_attempts": max_attempts, "mode": "standard"},
        )
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )

    # keys are relative to the prefix; the blob rows record them
    @staticmethod
    def blob_key(digest: str) -> str:
        return f"blobs/sha256/{digest_hex(digest)}"

    @staticmethod
    def staging_key(upload_id: str) -> str:
        return f"uploads/{check_upload_id(upload_id)}"

    @staticmethod
    def multipart_key(upload_id: str) -> str:
        return f"blobs/uploads/{check_upload_id(upload_id)}"

    @staticmethod
    def part_key(upload_id: str, number: int) -> str:
        return f"parts/{check_upload_id(upload_id)}/{number}"

    def _upload_key(self, ref: UploadRef) -> str:
        return self.multipart_key(ref.upload_id) if ref.multipart_id else self.staging_key(ref.upload_id)

    def _object(self, key: str) -> dict:
        return {"Bucket": self.bucket, "Key": self.prefix + key}

    def _presign(self, method: str, key: str, **params) -> str:
        return self.client.generate_presigned_url(
            method, Params={**self._object(key), **params}, ExpiresIn=self.presign_ttl
        )

    # --- uploads ---------------------------------------------------------------------------
    def begin_upload(self, upload_id: str, max_size: int) -> UploadTarget:
        if max_size <= self.multipart_threshold:
            return UploadTarget(method="s3-put", url=self._presign("put_object", self.staging_key(upload_id)))
        part_size = max(self.part_size, math.ceil(max_size / MAX_PARTS))
        with _store_errors("CreateMultipartUpload"):
            mpu_id = self.client.create_multipart_upload(**self._object(self.multipart_key(upload_id)))[
                "UploadId"
            ]
        return UploadTarget(method="s3-multipart", part_size=part_size, multipart_id=mpu_id)

    def part_urls(self, ref: UploadRef, numbers: range) -> list[UploadPart]:
        return [
            UploadPart(number=n, url=self._presign("put_object", self.part_key(ref.upload_id, n)))
            for n in numbers
        ]

    def resume_upload(self, ref: UploadRef, *, method: str) -> UploadTarget:
        if method == "s3-put":
            return UploadTarget(
                method=method, url=self._presign("put_object", self.staging_key(ref.upload_id))
            )
        received = [
            ReceivedPart(number=number, size=size, etag=etag) for number, size, etag in self._parts(ref)
        ]
        return UploadTarget(method=method, received=received, multipart_id=ref.multipart_id)

    def _parts(self, ref: UploadRef) -> Iterator[tuple[int, int, str]]:
        """(number, size, ETag) of each part object the upload has, in part order."""
        prefix = f"parts/{check_upload_id(ref.upload_id)}/"
        found = []
        with _store_errors("ListObjectsV2"):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            ):
                for obj in page.get("Contents", []):
                    name = obj["Key"].rsplit("/", 1)[-1]
                    if name.isdigit():
                        found.append((int(name), int(obj["Size"]), obj["ETag"]))
        return iter(sorted(found))

    def stored_part_size(self, ref: UploadRef, number: int) -> int | None:
        head = self._head_if_exists(self.part_key(ref.upload_id, number))
        return None if head is None else int(head["ContentLength"])

    def fetch_part(self, ref: UploadRef, number: int, *, max_bytes: int) -> FetchedPart | None:
        obj = self._get_if_exists(self.part_key(ref.upload_id, number))
        if obj is None:
            return None
        body = _GuardedBody(obj["Body"], "GetObject")
        try:
            data = bytearray()
            while len(data) < max_bytes and (buf := body.read(min(8 << 20, max_bytes - len(data)))):
                data += buf
        finally:
            body.close()
        return FetchedPart(number=number, data=bytes(data), etag=obj["ETag"])

    def assemble_part(self, ref: UploadRef, part: FetchedPart) -> str:
        target = {**self._object(self.multipart_key(ref.upload_id)), "UploadId": ref.multipart_id}
        if self.part_copy:
            etag = self._copy_part(ref, part, target)
            # The copy must be the bytes that were verified: a PUT to the part's key after they
            # were read (CopySourceIfMatch, which moto and s3rver ignore, would refuse it) shows
            # as another MD5; then the verified bytes are sent instead.
            if (
                etag is not None
                and etag.strip('"') == hashlib.md5(part.data, usedforsecurity=False).hexdigest()
            ):
                return etag
        try:
            return self.client.upload_part(**target, PartNumber=part.number, Body=part.data)["ETag"]
        except ClientError as exc:
            raise self._assembly_error("UploadPart", ref, exc) from None
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise BlobStoreError(f"S3 UploadPart failed: {exc}") from None

    def _copy_part(self, ref: UploadRef, part: FetchedPart, target: dict) -> str | None:
        """UploadPartCopy of the part object inside the store; None where the store has none."""
        source = self._object(self.part_key(ref.upload_id, part.number))
        try:
            answer = self.client.upload_part_copy(
                **target, PartNumber=part.number, CopySource=source, CopySourceIfMatch=part.etag
            )
        except ClientError as exc:
            if _code(exc) in _UNSUPPORTED:
                self.part_copy = False  # s3rver: every part is sent from the verified bytes
                return None
            if _code(exc) in ("PreconditionFailed", "412"):
                return None  # the part's key holds another PUT by now
            raise self._assembly_error("UploadPartCopy", ref, exc) from None
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise BlobStoreError(f"S3 UploadPartCopy failed: {exc}") from None
        return answer["CopyPartResult"]["ETag"]

    @staticmethod
    def _assembly_error(what: str, ref: UploadRef, exc: ClientError) -> Exception:
        if _code(exc) in _NOT_FOUND:
            return ConflictError(
                f"the blob of upload {ref.upload_id} was assembled or dropped meanwhile "
                f"({what}: {_code(exc)})"
            )
        message = exc.response.get("Error", {}).get("Message", "")
        return BlobStoreError(f"S3 {what} failed: {_code(exc)} {message}".strip())

    def assembled(self, ref: UploadRef) -> bool:
        return self._head_if_exists(self.multipart_key(ref.upload_id)) is not None

    def complete_assembly(self, ref: UploadRef, etags: list[tuple[int, str]]) -> bool:
        try:
            self.client.complete_multipart_upload(
                **self._object(self.multipart_key(ref.upload_id)),
                UploadId=ref.multipart_id,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in etags]},
            )
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return False  # completed by an earlier call whose publication is being retried
            message = exc.response.get("Error", {}).get("Message", "")
            raise BlobStoreError(
                f"S3 CompleteMultipartUpload failed: {_code(exc)} {message}".strip()
            ) from None
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise BlobStoreError(f"S3 CompleteMultipartUpload failed: {exc}") from None
        return True

    def drop_parts(self, ref: UploadRef) -> None:
        keys = [self.prefix + self.part_key(ref.upload_id, number) for number, _, _ in self._parts(ref)]
        with _store_errors("DeleteObjects"):
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": key} for key in keys[i : i + 1000]], "Quiet": True},
                )

    @contextlib.contextmanager
    def open_staged(self, ref: UploadRef) -> Iterator[StagedBlob]:
        token_prefix = ""
        obj = self._get_if_exists(self._upload_key(ref))
        if obj is None and not ref.multipart_id:
            # Copied to its blob key by a `complete` that died before its commit: verified again there.
            obj, token_prefix = self._get_if_exists(self.blob_key(ref.digest)), _PROMOTED
        if obj is None:
            raise ConflictError(
                f"no bytes were received for upload {ref.upload_id}; send them before completing"
            )
        body = _GuardedBody(obj["Body"], "GetObject")
        try:
            yield StagedBlob(stream=body, size=int(obj["ContentLength"]), token=token_prefix + obj["ETag"])
        finally:
            body.close()

    def _get_if_exists(self, key: str) -> dict | None:
        return self._if_exists(self.client.get_object, "GetObject", key)

    def _head_if_exists(self, key: str) -> dict | None:
        return self._if_exists(self.client.head_object, "HeadObject", key)

    def _if_exists(self, call, what: str, key: str) -> dict | None:
        """The answer of `call` (GetObject, HeadObject) for `key`, or None where it has no object."""
        try:
            return call(**self._object(key))
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return None
            raise BlobStoreError(f"S3 {what} failed: {_code(exc)}") from None
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise BlobStoreError(f"S3 {what} failed: {exc}") from None

    def promote(self, ref: UploadRef, token: str) -> str:
        if ref.multipart_id:
            return self._upload_key(ref)  # already at its final key, and immutable
        if token.startswith(_PROMOTED):
            return self.blob_key(ref.digest)  # copied there before a crash, and verified again now
        source = self._object(self.staging_key(ref.upload_id))
        key = self.blob_key(ref.digest)
        # CopySourceIfMatch: copy exactly the object that was verified, not a later re-PUT.
        with _store_errors("CopyObject"):
            self.client.copy_object(CopySource=source, **self._object(key), CopySourceIfMatch=token)
            self.client.delete_object(**source)
        return key

    def discard(self, ref: UploadRef) -> None:
        obj = self._object(self._upload_key(ref))
        if ref.multipart_id:
            self.drop_parts(ref)
        with _store_errors("cleanup of an upload"):
            if ref.multipart_id:
                try:
                    self.client.abort_multipart_upload(**obj, UploadId=ref.multipart_id)
                except ClientError as exc:
                    # s3rver has no AbortMultipartUpload: its unfinished upload holds only the
                    # verified copies of parts, and no key points at them.
                    if _code(exc) not in _NOT_FOUND | _UNSUPPORTED:
                        raise
            self.client.delete_object(**obj)

    def _staged_objects(self) -> Iterator[tuple[str, str, dt.datetime]]:
        """(key, upload id, modified) of each single-PUT staging object and each part object."""
        for key, modified in self._list("uploads/"):
            yield key, key.rsplit("/", 1)[-1], modified
        for key, modified in self._list("parts/"):
            yield key, key.split("/")[1], modified

    def list_staging(self) -> Iterator[StoredObject]:
        seen = set()
        for _, upload_id, modified in self._staged_objects():
            if upload_id not in seen:
                seen.add(upload_id)
                yield StoredObject(key=upload_id, modified=modified)
        for up in self._multipart_uploads():
            yield StoredObject(key=_multipart_upload_id(up["Key"]), modified=up["Initiated"])

    def _multipart_uploads(self) -> Iterator[dict]:
        """The unfinished multipart uploads under the prefix; none where the store cannot list
        them (s3rver has no ListMultipartUploads)."""
        with _store_errors("ListMultipartUploads"):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix + "blobs/"
            )
            try:
                for page in pages:
                    yield from page.get("Uploads", [])
            except ClientError as exc:
                if _code(exc) not in _UNSUPPORTED:
                    raise

    def sweep_staging(self, *, live_upload_ids: set[str], older_than: dt.datetime) -> int:
        removed = 0
        for key, upload_id, modified in list(self._staged_objects()):
            if upload_id not in live_upload_ids and modified < older_than:
                self.delete(key)
                removed += 1
        # multipart uploads never completed hold parts that no object listing shows
        for up in list(self._multipart_uploads()):
            upload_id = _multipart_upload_id(up["Key"])
            if upload_id not in live_upload_ids and up["Initiated"] < older_than:
                with _store_errors("AbortMultipartUpload"):
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                    )
                removed += 1
        return removed

    # --- blobs -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_blob(self, key: str) -> Iterator[IO[bytes]]:
        with _store_errors("GetObject"):
            body = _GuardedBody(self.client.get_object(**self._object(key))["Body"], "GetObject")
        try:
            yield body
        finally:
            body.close()

    def download(self, key: str, *, filename: str) -> Download:
        return Download(url=self._presign("get_object", key))

    def delete(self, key: str) -> None:
        with _store_errors("DeleteObject"):
            self.client.delete_object(**self._object(key))

    def _list(self, sub: str) -> Iterator[tuple[str, dt.datetime]]:
        with _store_errors("ListObjectsV2"):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + sub
            ):
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(self.prefix) :], obj["LastModified"]

    def list_blobs(self) -> Iterator[StoredObject]:
        for key, modified in self._list("blobs/sha256/"):
            if _BLOB_NAME.fullmatch(key.rsplit("/", 1)[-1]):
                yield StoredObject(key=key, modified=modified)
        for key, modified in self._list("blobs/uploads/"):
            if _UPLOAD_NAME.fullmatch(key.rsplit("/", 1)[-1]):
                yield StoredObject(key=key, modified=modified)

    def check(self) -> None:
        with _store_errors(f"HeadBucket {self.bucket}"):
            self.client.head_bucket(Bucket=self.bucket)
