"""S3 blob store (any S3-compatible endpoint): clients move bytes through presigned URLs, one PUT
for small blobs and part PUTs of a multipart upload for large ones; the server only verifies and
promotes. Keys: `<prefix>/blobs/sha256/<hex>` and `<prefix>/uploads/<upload id>`.

Request checksums are computed only when an operation requires them, because several
S3-compatible services reject the newer default checksum headers.
"""

from __future__ import annotations

import contextlib
import math
from typing import IO, Iterator

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ..errors import BlobStoreError, ConflictError
from .base import BlobStore, Download, StagedBlob, StoredObject, UploadPart, UploadTarget, digest_hex

MAX_PARTS = 10_000
MAX_SINGLE_COPY = 5 * 1024**3  # CopyObject's limit; larger blobs are copied part by part
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchUpload"}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _store_errors(what: str) -> Iterator[None]:
    try:
        yield
    except ClientError as exc:
        raise BlobStoreError(f"S3 {what} failed: {_code(exc)} {exc.response.get('Error', {}).get('Message', '')}".strip()) from None
    except BotoCoreError as exc:
        raise BlobStoreError(f"S3 {what} failed: {exc}") from None


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
        presign_ttl: int = 900,
        multipart_threshold: int = 64 << 20,
        part_size: int = 64 << 20,
    ):
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.presign_ttl = presign_ttl
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": addressing_style},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=max_pool_connections,
            retries={"max_attempts": 5, "mode": "standard"},
        )
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    def blob_key(self, digest: str) -> str:
        return f"{self.prefix}blobs/sha256/{digest_hex(digest)}"

    def staging_key(self, upload_id: str) -> str:
        if not upload_id.isalnum():
            raise ValueError(f"bad upload id {upload_id!r}")
        return f"{self.prefix}uploads/{upload_id}"

    def _presign(self, method: str, params: dict) -> str:
        return self.client.generate_presigned_url(method, Params={"Bucket": self.bucket, **params}, ExpiresIn=self.presign_ttl)

    # --- uploads ---------------------------------------------------------------------------
    def begin_upload(self, upload_id: str, size: int) -> UploadTarget:
        key = self.staging_key(upload_id)
        if size <= self.multipart_threshold:
            return UploadTarget(method="s3-put", url=self._presign("put_object", {"Key": key}))
        part_size = max(self.part_size, math.ceil(size / MAX_PARTS))
        with _store_errors("CreateMultipartUpload"):
            mpu_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        parts = []
        for i, offset in enumerate(range(0, size, part_size)):
            url = self._presign("upload_part", {"Key": key, "UploadId": mpu_id, "PartNumber": i + 1})
            parts.append(UploadPart(number=i + 1, url=url, offset=offset, size=min(part_size, size - offset)))
        return UploadTarget(method="s3-multipart", parts=parts, part_size=part_size, store_upload_id=mpu_id)

    def finish_parts(self, upload_id: str, store_upload_id: str, *, expected_parts: int) -> None:
        key = self.staging_key(upload_id)
        parts: list[dict] = []
        with _store_errors("ListParts"):
            paginator = self.client.get_paginator("list_parts")
            for page in paginator.paginate(Bucket=self.bucket, Key=key, UploadId=store_upload_id):
                parts.extend({"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in page.get("Parts", []))
        numbers = sorted(p["PartNumber"] for p in parts)
        if numbers != list(range(1, expected_parts + 1)):
            raise ConflictError(
                f"upload {upload_id} has parts {numbers[:5]}{'...' if len(numbers) > 5 else ''} of {expected_parts}; "
                "upload every part before completing"
            )
        with _store_errors("CompleteMultipartUpload"):
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=store_upload_id,
                MultipartUpload={"Parts": sorted(parts, key=lambda p: p["PartNumber"])},
            )

    @contextlib.contextmanager
    def open_staged(self, upload_id: str) -> Iterator[StagedBlob]:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.staging_key(upload_id))
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                raise ConflictError(f"no bytes were received for upload {upload_id}; send them before completing") from None
            raise BlobStoreError(f"S3 GetObject failed: {_code(exc)}") from None
        body = obj["Body"]
        try:
            yield StagedBlob(stream=body, size=int(obj["ContentLength"]), token=obj["ETag"])
        finally:
            body.close()

    def promote(self, upload_id: str, digest: str, token: str) -> None:
        source = {"Bucket": self.bucket, "Key": self.staging_key(upload_id)}
        # CopySourceIfMatch: copy exactly the object that was verified, not a later re-PUT.
        with _store_errors("CopyObject"):
            head = self.client.head_object(**source, IfMatch=token)
            if head["ContentLength"] <= MAX_SINGLE_COPY:
                self.client.copy_object(CopySource=source, Bucket=self.bucket, Key=self.blob_key(digest), CopySourceIfMatch=token)
            else:
                self.client.copy(
                    source, self.bucket, self.blob_key(digest), ExtraArgs={"CopySourceIfMatch": token},
                    Config=TransferConfig(multipart_chunksize=1 << 30, max_concurrency=8),
                )
            self.client.delete_object(**source)

    def discard(self, upload_id: str, store_upload_id: str | None = None) -> None:
        key = self.staging_key(upload_id)
        with _store_errors("cleanup of an upload"):
            mpu_ids = [store_upload_id] if store_upload_id else [
                up["UploadId"]
                for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=key)
                for up in page.get("Uploads", []) if up["Key"] == key
            ]
            for mpu_id in mpu_ids:
                try:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=mpu_id)
                except ClientError as exc:
                    if _code(exc) not in _NOT_FOUND:
                        raise
            self.client.delete_object(Bucket=self.bucket, Key=key)

    # --- blobs -----------------------------------------------------------------------------
    def exists(self, digest: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.blob_key(digest))
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return False
            raise BlobStoreError(f"S3 HeadObject failed: {_code(exc)}") from None
        return True

    @contextlib.contextmanager
    def open_blob(self, digest: str) -> Iterator[IO[bytes]]:
        with _store_errors("GetObject"):
            body = self.client.get_object(Bucket=self.bucket, Key=self.blob_key(digest))["Body"]
        try:
            yield body
        finally:
            body.close()

    def download(self, digest: str, *, filename: str) -> Download:
        return Download(url=self._presign("get_object", {"Key": self.blob_key(digest)}))

    def delete(self, digest: str) -> None:
        with _store_errors("DeleteObject"):
            self.client.delete_object(Bucket=self.bucket, Key=self.blob_key(digest))

    def _list(self, prefix: str) -> Iterator[tuple[str, object]]:
        with _store_errors("ListObjectsV2"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(prefix):], obj["LastModified"]

    def list_blobs(self) -> Iterator[StoredObject]:
        for name, modified in self._list(f"{self.prefix}blobs/sha256/"):
            if len(name) == 64:
                yield StoredObject(name="sha256:" + name, modified=modified)

    def list_staged(self) -> Iterator[StoredObject]:
        yield from (StoredObject(name=name, modified=modified) for name, modified in self._list(f"{self.prefix}uploads/"))
        # Multipart uploads never completed hold parts that no object listing shows.
        with _store_errors("ListMultipartUploads"):
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}uploads/"):
                for up in page.get("Uploads", []):
                    yield StoredObject(name=up["Key"].rsplit("/", 1)[-1], modified=up["Initiated"])

    def check(self) -> None:
        with _store_errors(f"HeadBucket {self.bucket}"):
            self.client.head_bucket(Bucket=self.bucket)
