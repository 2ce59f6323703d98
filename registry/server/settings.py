"""The registry's one settings object, read from `DELTASTORE_*` environment variables.

settings = Settings()                      # env: DELTASTORE_DATABASE_URL, DELTASTORE_BLOB_URL, ...
settings = Settings(data_dir="/srv/ds")    # embedded default: SQLite + blobs under the data dir
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

GiB = 1 << 30
MiB = 1 << 20
#: Largest safetensors header an upload may have by default. A delta's header is some 150 bytes per
#: tensor (a few hundred KB for a 70B model), so this is generous, yet far below safetensors' own
#: 100 MB limit, which a tiny zstd frame could otherwise expand into (a padded header held in memory).
DEFAULT_MAX_HEADER_BYTES = 16 * MiB


def default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "deltastore"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DELTASTORE_", extra="ignore", frozen=True)

    data_dir: Path = Field(
        default_factory=default_data_dir, description="Holds the embedded SQLite database and local blobs."
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data_dir>/registry.db."
    )
    blob_url: str | None = Field(
        None, description="file:///path or s3://bucket/prefix; default file://<data_dir>/blobs."
    )

    s3_endpoint_url: str | None = Field(None, description="Any S3-compatible endpoint (MinIO, Ceph, R2...).")
    s3_region: str = "us-east-1"
    s3_addressing_style: Literal["auto", "path", "virtual"] = "path"
    s3_max_pool_connections: int = 32
    s3_max_attempts: int = Field(
        5, ge=1, le=20, description="Attempts per S3 request (retries back off exponentially)."
    )

    auth_enabled: bool = Field(
        False, description="Require bearer tokens for writes (and for reads unless anonymous_read)."
    )
    anonymous_read: bool = Field(
        True, description="With auth on, allow reading public repositories without a token."
    )
    admin_token: SecretStr | None = Field(
        None, description="Bootstrap token with global admin rights (creates the other tokens)."
    )

    max_upload_bytes: int = Field(32 * GiB, gt=0, description="Largest stored (zstd) blob accepted.")
    max_raw_bytes: int = Field(
        64 * GiB, gt=0, description="Largest decompressed delta accepted (zip-bomb guard)."
    )
    max_header_bytes: int = Field(
        DEFAULT_MAX_HEADER_BYTES,
        gt=0,
        le=100_000_000,
        description="Largest safetensors header of an uploaded delta (safetensors allows 100 MB).",
    )
    max_json_bytes: int = Field(
        1 * MiB,
        gt=0,
        description="Largest JSON request body accepted (blob bytes are limited by max_upload_bytes).",
    )
    presign_ttl_seconds: int = Field(
        900, gt=0, le=7 * 24 * 3600, description="Lifetime of presigned S3 URLs (S3 allows at most 7 days)."
    )
    upload_ttl_seconds: int = Field(
        24 * 3600, ge=0, description="Pending uploads older than this are stale (GC removes them)."
    )
    gc_grace_seconds: int = Field(
        3600, ge=0, description="Store objects younger than this are never collected (in-flight pushes)."
    )
    multipart_threshold: int = Field(
        16 * MiB, gt=0, description="S3 uploads above this size use multipart part URLs."
    )
    multipart_part_size: int = Field(
        8 * MiB,
        gt=0,
        description="S3 multipart part size (S3 needs >= 5 MiB; raised to stay within 10,000 parts).",
    )
    part_checks: int = Field(
        8,
        ge=0,
        description="Multipart S3 uploads whose parts one server process verifies as they arrive, at "
        "once (each holds a few parts in memory); others are verified whole at `complete`.",
    )
    page_size: int = Field(50, gt=0)
    max_page_size: int = Field(500, gt=0)

    @property
    def embedded(self) -> bool:
        """True when the database is the default SQLite file under the data dir."""
        return self.database_url is None

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'registry.db'}"

    @property
    def resolved_blob_url(self) -> str:
        return self.blob_url or (self.data_dir / "blobs").resolve().as_uri()
