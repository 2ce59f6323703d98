"""Request and response bodies of the `/v1` API."""

from __future__ import annotations

import datetime as dt
import math
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field
from pydantic import BaseModel as Schema

from registry.common.names import BASE_NAME_PATTERN, DIGEST_PATTERN, SEGMENT_PATTERN

T = TypeVar("T")
Digest = Field(pattern=DIGEST_PATTERN, description="sha256:<64 hex>")
MAX_JSON_DEPTH = 32
#: Largest size or count a body may state: exactly representable as a JSON double, far above any limit.
MAX_COUNT = 2**53


def _json_int(value: Any) -> Any:
    """A JSON integer: `3` or `3.0` (JSON has one number type), never `true` or `"3"`."""
    if isinstance(value, bool) or isinstance(value, str):
        raise ValueError("must be a JSON integer")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def json_int(**bounds: int) -> Any:
    """An integer field with `bounds` (ge, le) that takes JSON integers only (see `_json_int`)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_json_int)]


class RequestBody(Schema):
    """A request body."""


def _unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # neither database driver can encode a lone surrogate
        raise ValueError("must be valid Unicode (it holds a lone surrogate)") from None
    return value


def _clean_text(value: str) -> str:
    """Text the index can store on every backend: Unicode, and no NUL (PostgreSQL text refuses it)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return _unicode(value)


def _clean_json(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON object the index can store and serve back: Unicode strings, finite numbers (JSON has
    no NaN or Infinity), bounded depth. Walked without recursion. (NUL is fine inside JSON: it is
    stored escaped.)"""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, str):
            _unicode(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError("numbers must be finite (JSON has no NaN or Infinity)")
        elif isinstance(item, dict):
            for key, child in item.items():
                _unicode(key)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return value


Text = Annotated[str, AfterValidator(_clean_text), Field(json_schema_extra={"pattern": "^[^\\u0000]*$"})]
JsonObject = Annotated[dict[str, Any], AfterValidator(_clean_json)]
#: Checked by the `names` validators (400 invalid_name); the pattern documents the rule.
SegmentName = Annotated[str, Field(json_schema_extra={"pattern": SEGMENT_PATTERN, "maxLength": 64})]


class ErrorDetail(Schema):
    code: str
    message: str


class ErrorBody(Schema):
    error: ErrorDetail


class Page(Schema, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        None,
        pattern="^[0-9]+$",
        description="Pass as ?cursor= for the next page (decimal digits); null on the last page.",
    )


# --- bases -----------------------------------------------------------------------------------
class BaseCreate(RequestBody):
    name: str = Field(examples=["meta-llama/Llama-3.1-8B"], json_schema_extra={"pattern": BASE_NAME_PATTERN})
    fingerprint: str = Digest
    architecture: Text | None = Field(None, max_length=128)
    parameter_count: json_int(ge=0, le=MAX_COUNT) | None = None
    config: JsonObject | None = None


class BaseOut(Schema):
    model_config = ConfigDict(from_attributes=True)

    name: str
    fingerprint: str
    architecture: str | None
    parameter_count: int | None
    config: dict[str, Any] | None
    created_by: str
    created_at: dt.datetime


# --- repositories ----------------------------------------------------------------------------
class RepoCreate(RequestBody):
    namespace: SegmentName
    name: SegmentName
    base: str = Field(
        description="Registered base model name, e.g. org/model.",
        json_schema_extra={"pattern": BASE_NAME_PATTERN},
    )
    description: Text = Field("", max_length=10_000)
    visibility: Literal["public", "private"] = "public"


class LatestVersionOut(Schema):
    """What a listing shows of a repository's newest version."""

    number: int
    digest: str
    size: int
    raw_size: int
    codec: str | None
    size_ratio: float | None
    ready_at: dt.datetime | None


class RepoOut(Schema):
    namespace: str
    name: str
    full_name: str
    base: str
    base_fingerprint: str
    description: str
    visibility: str
    latest_version: int | None
    latest: LatestVersionOut | None = Field(
        None, description="The version `latest` points at; null before the first push."
    )
    created_by: str
    created_at: dt.datetime


# --- versions --------------------------------------------------------------------------------
class VersionOut(Schema):
    repository: str
    number: int
    tags: list[str]
    digest: str
    size: int
    raw_digest: str
    raw_size: int
    codec: str | None
    dtype: str | None
    bits: int | None
    size_ratio: float | None
    fidelity: dict[str, Any] | None
    metadata: dict[str, Any] | None
    description: str
    created_by: str
    created_at: dt.datetime
    ready_at: dt.datetime | None
    download_url: str


class VersionDeleted(Schema):
    repository: str
    number: int = Field(description="The version deleted.")
    removed_tags: list[str] = Field(
        description="The tags that pointed at it, removed with it (`latest` moves instead)."
    )
    latest: int | None = Field(description="The version `latest` points at now; null when none remains.")


# --- tags ------------------------------------------------------------------------------------
class TagSet(RequestBody):
    version: json_int(ge=1, le=2**31 - 1)


class TagOut(Schema):
    name: str
    version: int
    updated_by: str
    updated_at: dt.datetime


# --- uploads ---------------------------------------------------------------------------------
class UploadCreate(RequestBody):
    raw_size: json_int(ge=0, le=MAX_COUNT) = Field(description="Bytes of the decompressed .bdelta.")
    digest: str | None = Field(
        None,
        pattern=DIGEST_PATTERN,
        description="sha256 of the stored (zstd) blob, when the client knows it already (an earlier "
        "push): bytes the registry holds come back as `exists`. A streamed push names it at `complete`.",
    )
    size: json_int(ge=0, le=MAX_COUNT) | None = Field(None, description="Bytes of the stored (zstd) blob.")
    raw_digest: str | None = Field(None, pattern=DIGEST_PATTERN, description="sha256 of the .bdelta.")
    description: Text = Field("", max_length=10_000)
    fidelity: JsonObject | None = None


class ReportedPart(RequestBody):
    number: json_int(ge=1, le=10_000)
    etag: str = Field(min_length=1, max_length=1024)


class UploadComplete(RequestBody):
    """What the client's bytes are (a streamed push learns it only as it sends them); each must
    match the bytes the registry received, and any value declared up front. The body may be
    left out when the upload was declared with all of them."""

    digest: str = Field(pattern=DIGEST_PATTERN, description="sha256 of the stored blob.")
    size: json_int(ge=0, le=MAX_COUNT) = Field(description="Bytes of the stored (zstd) blob.")
    raw_digest: str = Field(pattern=DIGEST_PATTERN, description="sha256 of the .bdelta.")
    raw_size: json_int(ge=0, le=MAX_COUNT) = Field(description="Bytes of the decompressed .bdelta.")
    parts: list[ReportedPart] | None = Field(
        None,
        max_length=10_000,
        description="s3-multipart: each part's number and the ETag the store answered its PUT with, "
        "in order; they must be those of the parts the registry read and verified (else 409).",
    )


class UploadPartOut(Schema):
    number: int
    url: str = Field(description="PUT the part's bytes here (presigned; no credentials needed).")


class ReceivedPartOut(Schema):
    number: int
    size: int
    etag: str = Field(description="As the blob store reports it (S3: the quoted MD5 of the part).")


class UploadPartsOut(Schema):
    parts: list[UploadPartOut]


class UploadOut(Schema):
    id: str
    repository: str
    state: Literal["pending"] = "pending"
    method: Literal["exists", "stream", "s3-put", "s3-multipart"]
    exists: bool = Field(
        description="The registry already holds these bytes: skip sending them and complete."
    )
    upload_url: str | None = Field(None, description="PUT the whole blob here (methods stream and s3-put).")
    parts_url: str | None = Field(
        None,
        description="s3-multipart: GET it with `first` and `count` for the URLs of those parts, "
        "asked for as the client makes them; every part is `part_size` bytes but the last. The "
        "registry reads and verifies each part as soon as it is stored.",
    )
    part_size: int | None = None
    received_parts: list[ReceivedPartOut] = Field(
        default_factory=list,
        description="s3-multipart, GET of a pending upload: the parts the store already holds (a "
        "resumed push sends only the others).",
    )
    complete_url: str
    expires_at: dt.datetime


class UploadReceived(Schema):
    id: str
    received: int
    digest: str
    raw_size: int
    raw_digest: str


# --- tokens ----------------------------------------------------------------------------------
class ScopeIn(Schema):
    namespace: str = Field(
        description="A namespace, or * for every namespace.",
        json_schema_extra={"pattern": "^(?:\\*|[a-z0-9][a-z0-9._-]{0,63})$"},
    )
    permission: Literal["read", "write", "admin"]


class TokenCreate(RequestBody):
    name: Text = Field(min_length=1, max_length=128)
    scopes: list[ScopeIn] = Field(min_length=1)
    expires_in_seconds: json_int(ge=1, le=10 * 365 * 86400) | None = Field(
        None, description="Lifetime; omit for a token that never expires."
    )


class TokenOut(Schema):
    id: int
    name: str
    prefix: str
    scopes: list[ScopeIn]
    created_by: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    expires_at: dt.datetime | None = None


class TokenCreated(TokenOut):
    token: str = Field(description="The secret; shown only once.")


class WhoAmI(Schema):
    name: str
    authenticated: bool
    scopes: dict[str, str]
    auth_enabled: bool


# --- admin -----------------------------------------------------------------------------------
class GcOut(Schema):
    stale_uploads: int
    staged_objects: int
    blobs: int
    orphan_objects: int
    dry_run: bool


class FsckOut(Schema):
    ok: bool = Field(description="The index and the blob store agree: no problem below is non-zero.")
    clean: bool = Field(
        description=(
            "ok, and no leftovers (orphan objects, staging leftovers, unreferenced blobs, stale uploads)."
        )
    )
    versions: int
    blobs: int
    objects: int
    bytes_verified: int
    missing_objects: int
    digest_mismatches: int
    dangling_versions: int
    number_errors: int
    tag_errors: int
    orphan_objects: int
    staging_leftovers: int
    unreferenced_blobs: int
    pending_uploads: int
    stale_uploads: int
    digests_checked: bool
    details: list[str] = Field(description="The first 100 problems and leftovers, one line each.")


class ReadyOut(Schema):
    status: Literal["ready"]
    checks: dict[str, str]


class NotReadyBody(ErrorBody):
    checks: dict[str, str]


class AuditEventOut(Schema):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: dt.datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any] | None
