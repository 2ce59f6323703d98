"""Registry errors: each carries the HTTP status and the stable `code` of the API's error body
`{"error": {"code", "message"}}`; rooted in codec's `DeltaStoreError`.
"""

from __future__ import annotations

from codec.errors import DeltaStoreError


class RegistryError(DeltaStoreError):
    """Root of the registry's errors; `status` and `code` define the HTTP answer."""

    status: int = 500
    code: str = "internal_error"


class InvalidRequestError(RegistryError, ValueError):
    status, code = 400, "invalid_request"


class InvalidNameError(InvalidRequestError):
    status, code = 400, "invalid_name"


class AuthenticationError(RegistryError, PermissionError):
    status, code = 401, "unauthenticated"


class PermissionDeniedError(RegistryError, PermissionError):
    status, code = 403, "forbidden"


class NotFoundError(RegistryError, LookupError):
    status, code = 404, "not_found"


class ConflictError(RegistryError):
    status, code = 409, "conflict"


class BaseMismatchUploadError(ConflictError):
    """The upload was made for another base model than the repository's."""

    code = "base_mismatch"


class UploadTooLargeError(RegistryError, ValueError):
    status, code = 413, "too_large"


class DigestMismatchError(RegistryError, ValueError):
    """The stored bytes do not have the size or sha256 the client declared."""

    status, code = 422, "digest_mismatch"


class SizeMismatchError(DigestMismatchError):
    """The bytes sent or stored (or what they decompress to) are not of the size the upload declared."""

    code = "size_mismatch"


class InvalidUploadError(RegistryError, ValueError):
    """The upload is not a valid format-v1 delta (bad zstd frame or bad header)."""

    status, code = 422, "invalid_delta"


class BlobStoreError(RegistryError, OSError):
    status, code = 502, "blob_store_error"


class StorageFullError(BlobStoreError):
    """The blob store has no space left; the partial bytes were removed and nothing was stored."""

    status, code = 507, "insufficient_storage"


class DatabaseUnavailableError(RegistryError):
    """The registry cannot use its database right now (restarting, failing over, unreachable or
    locked); the request changed nothing and may be retried (the answer carries `Retry-After`)."""

    status, code = 503, "database_unavailable"


class SchemaOutOfDateError(RegistryError, RuntimeError):
    """The database schema is not at the migrations' head; the message names the fixing command."""

    status, code = 503, "schema_out_of_date"
