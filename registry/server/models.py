"""SQLAlchemy models of the registry index: bases, repositories, versions, tags, blobs, uploads,
API tokens and audit events. The schema itself is created only by the migrations in migrations/.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

#: Every constraint gets a predictable name, so migrations can refer to it on any database.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

DIGEST_LEN = 71  # "sha256:" + 64 hex
PENDING, READY = "pending", "ready"
PERMISSIONS = ("read", "write", "admin")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC timestamp on every backend (SQLite stores it naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSON()}


class BaseModel(Base):
    """A base model that deltas are made against, identified by name and weight fingerprint."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    fingerprint: Mapped[str] = mapped_column(String(DIGEST_LEN), index=True)
    architecture: Mapped[str | None] = mapped_column(String(128))
    parameter_count: Mapped[int | None] = mapped_column(BigInteger)
    config: Mapped[dict[str, Any] | None]
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Repository(Base):
    """A delta repository `namespace/name`: the numbered versions of one fine-tune of one base."""

    __tablename__ = "repositories"
    __table_args__ = (
        UniqueConstraint("namespace", "name"),
        CheckConstraint("visibility IN ('public', 'private')", name="visibility"),
        CheckConstraint("next_version >= 1", name="next_version_positive"),
        Index(None, "name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id", ondelete="RESTRICT"), index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    visibility: Mapped[str] = mapped_column(String(16), default="public")
    #: The number the next ready version gets; bumped with UPDATE ... RETURNING under the row lock.
    next_version: Mapped[int] = mapped_column(Integer, default=1)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    base_model: Mapped[BaseModel] = relationship(lazy="joined", innerjoin=True)

    @property
    def full_name(self) -> str:
        return f"{self.namespace}/{self.name}"


class Blob(Base):
    """A stored zstd blob, addressed by the sha256 of its bytes; versions with identical bytes share one."""

    __tablename__ = "blobs"
    __table_args__ = (CheckConstraint("size >= 0 AND raw_size >= 0", name="sizes_non_negative"),)

    digest: Mapped[str] = mapped_column(String(DIGEST_LEN), primary_key=True)
    #: Where the bytes are in the blob store; derived from the digest (and upload id), never from names.
    store_key: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger)
    raw_digest: Mapped[str] = mapped_column(String(DIGEST_LEN))
    raw_size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Version(Base):
    """One pushed delta. `pending` (no number, invisible) until its blob is stored and verified,
    then `ready` with the repository's next number."""

    __tablename__ = "versions"
    __table_args__ = (
        UniqueConstraint("repository_id", "number"),
        CheckConstraint("state IN ('pending', 'ready')", name="state"),
        CheckConstraint(
            "state = 'pending' OR (number IS NOT NULL AND blob_digest IS NOT NULL)",
            name="ready_has_number_and_blob",
        ),
        Index(None, "blob_digest"),
        Index(None, "upload_id", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repository_id: Mapped[int] = mapped_column(ForeignKey("repositories.id", ondelete="CASCADE"))
    #: The upload this version comes from: completing it again returns this version (NULL before
    #: migration 0003).
    upload_id: Mapped[str | None] = mapped_column(String(32))
    number: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=PENDING)
    blob_digest: Mapped[str | None] = mapped_column(ForeignKey("blobs.digest", ondelete="RESTRICT"))
    codec: Mapped[str | None] = mapped_column(String(32))
    dtype: Mapped[str | None] = mapped_column(String(16))
    bits: Mapped[int | None] = mapped_column(Integer)
    size_ratio: Mapped[float | None] = mapped_column(Float)
    fidelity: Mapped[dict[str, Any] | None]
    header_metadata: Mapped[dict[str, Any] | None]
    description: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ready_at: Mapped[dt.datetime | None]

    repository: Mapped[Repository] = relationship(lazy="joined", innerjoin=True)
    blob: Mapped[Blob | None] = relationship(lazy="joined")


class Tag(Base):
    """A movable name for a version; `latest` is kept on the newest ready version by the server."""

    __tablename__ = "tags"
    __table_args__ = (UniqueConstraint("repository_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repository_id: Mapped[int] = mapped_column(ForeignKey("repositories.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    updated_by: Mapped[str] = mapped_column(String(128))
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    version: Mapped[Version] = relationship(lazy="joined", innerjoin=True)


class Upload(Base):
    """The protocol state of a pending version: what the client declared (a streamed push declares
    only the raw size; the stored digest and sizes come with `complete`), where the bytes go, and
    what the server found in bytes it received itself (`received_*`)."""

    __tablename__ = "uploads"
    __table_args__ = (
        CheckConstraint("method IN ('exists', 'stream', 's3-put', 's3-multipart')", name="method"),
        CheckConstraint("size >= 0 AND raw_size >= 0", name="sizes_non_negative"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), unique=True)
    digest: Mapped[str | None] = mapped_column(String(DIGEST_LEN))
    size: Mapped[int | None] = mapped_column(BigInteger)
    raw_digest: Mapped[str | None] = mapped_column(String(DIGEST_LEN))
    raw_size: Mapped[int] = mapped_column(BigInteger)
    method: Mapped[str] = mapped_column(String(16))
    multipart_id: Mapped[str | None] = mapped_column(String(1024))
    part_size: Mapped[int | None] = mapped_column(BigInteger)
    received_size: Mapped[int | None] = mapped_column(BigInteger)
    received_digest: Mapped[str | None] = mapped_column(String(DIGEST_LEN))
    received_raw_digest: Mapped[str | None] = mapped_column(String(DIGEST_LEN))
    received_raw_size: Mapped[int | None] = mapped_column(BigInteger)
    #: The staged file the received_* values describe (bytes through the server).
    received_token: Mapped[str | None] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    expires_at: Mapped[dt.datetime]

    version: Mapped[Version] = relationship(lazy="joined", innerjoin=True)


class ApiToken(Base):
    """A bearer token, stored only as the sha256 of its secret."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None]
    #: After this instant the token is refused (NULL: it never expires).
    expires_at: Mapped[dt.datetime | None]

    scopes: Mapped[list[TokenScope]] = relationship(
        lazy="selectin", cascade="all, delete-orphan", order_by="TokenScope.namespace"
    )


class TokenScope(Base):
    """One grant of a token: `permission` (read < write < admin) in `namespace` (`*` = every namespace)."""

    __tablename__ = "token_scopes"
    __table_args__ = (
        UniqueConstraint("token_id", "namespace"),
        CheckConstraint("permission IN ('read', 'write', 'admin')", name="permission"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id", ondelete="CASCADE"))
    namespace: Mapped[str] = mapped_column(String(64))
    permission: Mapped[str] = mapped_column(String(16))


class AuditEvent(Base):
    """Who did what to which target, when."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(256), index=True)
    detail: Mapped[dict[str, Any] | None]
