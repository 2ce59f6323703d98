"""Request and response bodies of the `/v1` API."""

from __future__ import annotations

import datetime as dt
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field

from .names import DIGEST_PATTERN

T = TypeVar("T")
Digest = Field(pattern=DIGEST_PATTERN, description="sha256:<64 hex>")


class ErrorDetail(Schema):
    code: str
    message: str


class ErrorBody(Schema):
    error: ErrorDetail


class Page(Schema, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page; null on the last page.")


# --- bases -----------------------------------------------------------------------------------
class BaseCreate(Schema):
    name: str = Field(examples=["meta-llama/Llama-3.1-8B"])
    fingerprint: str = Digest
    architecture: str | None = Field(None, max_length=128)
    parameter_count: int | None = Field(None, ge=0)
    config: dict[str, Any] | None = None


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
class RepoCreate(Schema):
    namespace: str
    name: str
    base: str = Field(description="Registered base model name, e.g. org/model.")
    description: str = Field("", max_length=10_000)
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
    latest: LatestVersionOut | None = Field(None, description="The version `latest` points at; null before the first push.")
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


# --- tags ------------------------------------------------------------------------------------
class TagSet(Schema):
    version: int = Field(ge=1)


class TagOut(Schema):
    name: str
    version: int
    updated_by: str
    updated_at: dt.datetime


# --- uploads ---------------------------------------------------------------------------------
class UploadCreate(Schema):
    digest: str = Digest
    size: int = Field(ge=0, description="Bytes of the stored (zstd) blob.")
    raw_digest: str = Digest
    raw_size: int = Field(ge=0, description="Bytes of the decompressed .bdelta.")
    description: str = Field("", max_length=10_000)
    fidelity: dict[str, Any] | None = None


class UploadPartOut(Schema):
    number: int
    url: str
    offset: int
    size: int
    received: bool = Field(False, description="The store already holds this part (GET of a pending upload): skip it.")


class UploadOut(Schema):
    id: str
    repository: str
    state: Literal["pending"] = "pending"
    method: Literal["exists", "stream", "s3-put", "s3-multipart"]
    exists: bool = Field(description="The registry already holds these bytes: skip sending them and complete.")
    upload_url: str | None = Field(None, description="PUT the whole blob here (methods stream and s3-put).")
    parts: list[UploadPartOut] = Field(default_factory=list, description="PUT each byte range to its URL (s3-multipart).")
    part_size: int | None = None
    complete_url: str
    expires_at: dt.datetime


class UploadReceived(Schema):
    id: str
    received: int
    digest: str


# --- tokens ----------------------------------------------------------------------------------
class ScopeIn(Schema):
    namespace: str = Field(description="A namespace, or * for every namespace.")
    permission: Literal["read", "write", "admin"]


class TokenCreate(Schema):
    name: str = Field(min_length=1, max_length=128)
    scopes: list[ScopeIn] = Field(min_length=1)


class TokenOut(Schema):
    id: int
    name: str
    prefix: str
    scopes: list[ScopeIn]
    created_by: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None


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
    clean: bool = Field(description="ok, and no leftovers (orphan objects, staging leftovers, unreferenced blobs, stale uploads).")
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


class AuditEventOut(Schema):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: dt.datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any] | None
