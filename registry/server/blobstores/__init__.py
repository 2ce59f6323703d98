"""Blob stores behind one small interface: the local filesystem (embedded default) and S3.

store = open_blob_store(settings)     # file:///srv/blobs or s3://bucket/prefix
"""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from registry.common.errors import InvalidRequestError
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
)
from registry.server.blobstores.local import LocalBlobStore
from registry.server.settings import Settings


def open_blob_store(settings: Settings) -> BlobStore:
    url = settings.resolved_blob_url
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalBlobStore(unquote(parsed.path))
    if parsed.scheme == "s3":
        from registry.server.blobstores.s3 import S3BlobStore  # boto3 is only imported when S3 is configured

        if not parsed.netloc:
            raise InvalidRequestError(f"blob URL {url!r} has no bucket (expected s3://bucket/prefix)")
        return S3BlobStore(
            bucket=parsed.netloc,
            prefix=parsed.path.strip("/"),
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            addressing_style=settings.s3_addressing_style,
            max_pool_connections=settings.s3_max_pool_connections,
            max_attempts=settings.s3_max_attempts,
            presign_ttl=settings.presign_ttl_seconds,
            multipart_threshold=settings.multipart_threshold,
            part_size=settings.multipart_part_size,
        )
    raise InvalidRequestError(f"blob URL {url!r}: scheme must be file:// or s3://")


__all__ = [
    "BlobStore",
    "Download",
    "FetchedPart",
    "StagedBlob",
    "StoredObject",
    "ReceivedPart",
    "UploadPart",
    "UploadRef",
    "UploadTarget",
    "LocalBlobStore",
    "open_blob_store",
]
