"""Index operations on one open Session, keyword-only: every query of the registry lives here.
Callers own the transaction (`Database.read()` / `Database.write()`)."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry.common.errors import ConflictError, InvalidRequestError, NotFoundError
from registry.server.auth import hash_token, new_token_secret
from registry.server.models import (
    PENDING,
    READY,
    ApiToken,
    AuditEvent,
    BaseModel,
    Blob,
    Repository,
    Tag,
    TokenScope,
    Upload,
    Version,
    utcnow,
)

LATEST = "latest"


# --- cursors ---------------------------------------------------------------------------------
#: Ids and version numbers are 32-bit: a larger cursor means the same as the largest one.
_MAX_POSITION = 2**31 - 1


def encode_cursor(value: Any) -> str:
    """An opaque cursor holding any JSON value (the web pages' sorted listings: [key, id])."""
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> Any:
    if not cursor:
        return None
    try:
        return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, RecursionError):
        raise InvalidRequestError(f"invalid cursor {cursor[:40]!r}") from None


def encode_position(position: int) -> str:
    """The API listings' cursor: the id (or version number) the next page starts after, in decimal."""
    return str(position)


def _int_cursor(cursor: str | None) -> int | None:
    """The position of a cursor (None: the first page). Every string of decimal digits is one
    (the API documents them so), so any cursor the schema allows is answered, never refused; one
    beyond the 32-bit ids is clamped and must not overflow the database's integers."""
    if not cursor:
        return None
    if not (cursor.isascii() and cursor.isdigit()):
        raise InvalidRequestError(f"invalid cursor {cursor[:40]!r} (a cursor is decimal digits)")
    return min(int(cursor), _MAX_POSITION)


# --- audit -----------------------------------------------------------------------------------
def record_event(
    session: Session, *, actor: str, action: str, target: str, detail: dict | None = None
) -> None:
    session.add(AuditEvent(actor=actor, action=action, target=target, detail=detail))


def list_events(
    session: Session, *, target: str | None = None, cursor: str | None = None, limit: int
) -> tuple[list[AuditEvent], str | None]:
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit + 1)
    if target:
        query = query.where(AuditEvent.target == target)
    if (after := _int_cursor(cursor)) is not None:
        query = query.where(AuditEvent.id < after)
    rows = list(session.scalars(query))
    return rows[:limit], encode_position(rows[limit - 1].id) if len(rows) > limit else None


# --- bases -----------------------------------------------------------------------------------
def get_base(session: Session, *, name: str) -> BaseModel:
    base = session.scalar(select(BaseModel).where(BaseModel.name == name))
    if base is None:
        raise NotFoundError(f"base model {name!r} is not registered")
    return base


def create_base(
    session: Session,
    *,
    name: str,
    fingerprint: str,
    architecture: str | None,
    parameter_count: int | None,
    config: dict | None,
    actor: str,
) -> tuple[BaseModel, bool]:
    """Register a base; registering the same name and fingerprint again is a no-op (created=False)."""
    existing = session.scalar(select(BaseModel).where(BaseModel.name == name))
    if existing is not None:
        if existing.fingerprint != fingerprint:
            raise ConflictError(
                f"base model {name!r} is already registered with "
                f"fingerprint {existing.fingerprint}, not {fingerprint}"
            )
        return existing, False
    base = BaseModel(
        name=name,
        fingerprint=fingerprint,
        architecture=architecture,
        parameter_count=parameter_count,
        config=config,
        created_by=actor,
    )
    _add_unique(session, base, f"base model {name!r} already exists")
    record_event(session, actor=actor, action="create_base", target=name, detail={"fingerprint": fingerprint})
    return base, True


def delete_base(session: Session, *, name: str, actor: str) -> None:
    """Remove a registered base that no repository uses (refused with ConflictError otherwise)."""
    base = get_base(session, name=name)
    if session.get_bind().dialect.name == "postgresql":  # a repository created meanwhile waits for this row
        session.execute(select(BaseModel.id).where(BaseModel.id == base.id).with_for_update())
    used = session.scalar(
        select(func.count()).select_from(Repository).where(Repository.base_model_id == base.id)
    )
    if used:
        raise ConflictError(
            f"base model {name!r} is used by {used} repositor{'y' if used == 1 else 'ies'}; delete "
            f"{'it' if used == 1 else 'them'} first (GET /v1/bases/{name}/repos lists them)"
        )
    session.execute(delete(BaseModel).where(BaseModel.id == base.id))
    record_event(
        session, actor=actor, action="delete_base", target=name, detail={"fingerprint": base.fingerprint}
    )


def list_bases(session: Session, *, cursor: str | None, limit: int) -> tuple[list[BaseModel], str | None]:
    query = select(BaseModel).order_by(BaseModel.id).limit(limit + 1)
    if (after := _int_cursor(cursor)) is not None:
        query = query.where(BaseModel.id > after)
    rows = list(session.scalars(query))
    return rows[:limit], encode_position(rows[limit - 1].id) if len(rows) > limit else None


def _add_unique(session: Session, row, message: str) -> None:
    """Insert `row` inside a savepoint: a unique-name conflict becomes ConflictError and rolls back
    only the savepoint, so the caller's transaction stays usable. (The row is added inside it:
    `begin_nested()` flushes what is pending before it issues SAVEPOINT.)"""
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        raise ConflictError(message) from None


# --- repositories ----------------------------------------------------------------------------
def get_repo(session: Session, *, namespace: str, name: str) -> Repository:
    repo = session.scalar(
        select(Repository).where(Repository.namespace == namespace, Repository.name == name)
    )
    if repo is None:
        raise NotFoundError(f"repository {namespace}/{name} does not exist")
    return repo


def lock_repo(session: Session, *, repo_id: int) -> None:
    """Serialize writers of one repository (row lock on PostgreSQL; SQLite writers already hold the
    database lock)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(Repository.id).where(Repository.id == repo_id).with_for_update())


def create_repo(
    session: Session,
    *,
    namespace: str,
    name: str,
    base_name: str,
    description: str,
    visibility: str,
    actor: str,
) -> Repository:
    base = get_base(session, name=base_name)
    repo = Repository(
        namespace=namespace,
        name=name,
        base_model=base,
        description=description,
        visibility=visibility,
        created_by=actor,
    )
    _add_unique(session, repo, f"repository {namespace}/{name} already exists")
    record_event(
        session, actor=actor, action="create_repo", target=f"{namespace}/{name}", detail={"base": base_name}
    )
    return repo


def list_repos(
    session: Session,
    *,
    base_name: str | None = None,
    namespace: str | None = None,
    query: str | None = None,
    visible_namespaces: Sequence[str] | None = None,
    cursor: str | None,
    limit: int,
) -> tuple[list[Repository], str | None]:
    """Repositories by id, filtered; `visible_namespaces` (None = all) adds private repos of those
    namespaces."""
    stmt = select(Repository).order_by(Repository.id).limit(limit + 1)
    if base_name is not None:
        stmt = stmt.where(Repository.base_model_id == get_base(session, name=base_name).id)
    if namespace is not None:
        stmt = stmt.where(Repository.namespace == namespace)
    if query:
        pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        stmt = stmt.where(
            or_(Repository.name.like(pattern, escape="\\"), Repository.namespace.like(pattern, escape="\\"))
        )
    if visible_namespaces is not None:
        stmt = stmt.where(
            or_(Repository.visibility == "public", Repository.namespace.in_(list(visible_namespaces)))
        )
    if (after := _int_cursor(cursor)) is not None:
        stmt = stmt.where(Repository.id > after)
    rows = list(session.scalars(stmt))
    return rows[:limit], encode_position(rows[limit - 1].id) if len(rows) > limit else None


def latest_versions(session: Session, *, repo_ids: Sequence[int]) -> dict[int, Version]:
    """The version `latest` points at, per repository id (one query, blobs joined)."""
    if not repo_ids:
        return {}
    rows = session.scalars(
        select(Version)
        .join(Tag, Tag.version_id == Version.id)
        .where(Tag.repository_id.in_(list(repo_ids)), Tag.name == LATEST)
    )
    return {version.repository_id: version for version in rows}


def delete_repo(session: Session, *, repo: Repository, actor: str) -> None:
    session.execute(delete(Repository).where(Repository.id == repo.id))
    record_event(session, actor=actor, action="delete_repo", target=repo.full_name)


# --- versions --------------------------------------------------------------------------------
def get_version(session: Session, *, repo: Repository, ref: int | str) -> Version:
    if isinstance(ref, int):
        version = session.scalar(
            select(Version).where(
                Version.repository_id == repo.id, Version.number == ref, Version.state == READY
            )
        )
        if version is None:
            raise NotFoundError(f"{repo.full_name} has no version {ref}")
        return version
    version = session.scalar(
        select(Version)
        .join(Tag, Tag.version_id == Version.id)
        .where(Tag.repository_id == repo.id, Tag.name == ref)
    )
    if version is None:
        raise NotFoundError(
            f"{repo.full_name} has no tag {ref!r}" + (" (nothing pushed yet)" if ref == LATEST else "")
        )
    return version


def list_versions(
    session: Session, *, repo: Repository, cursor: str | None, limit: int, digest: str | None = None
) -> tuple[list[Version], str | None]:
    stmt = (
        select(Version)
        .where(Version.repository_id == repo.id, Version.state == READY)
        .order_by(Version.number.desc())
        .limit(limit + 1)
    )
    if digest is not None:
        stmt = stmt.where(Version.blob_digest == digest)
    if (before := _int_cursor(cursor)) is not None:
        stmt = stmt.where(Version.number < before)
    rows = list(session.scalars(stmt))
    return rows[:limit], encode_position(rows[limit - 1].number) if len(rows) > limit else None


def tags_by_version(session: Session, *, version_ids: Sequence[int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    if version_ids:
        for version_id, name in session.execute(
            select(Tag.version_id, Tag.name).where(Tag.version_id.in_(list(version_ids))).order_by(Tag.name)
        ):
            out.setdefault(version_id, []).append(name)
    return out


def delete_version(
    session: Session, *, repo: Repository, number: int, actor: str
) -> tuple[list[str], int | None]:
    """Delete version `number` and the tags that point at it; `latest` moves back to the newest
    remaining version. Returns the removed tags (`latest` is not one: it moves) and the number
    `latest` points at now (None when no version remains)."""
    lock_repo(session, repo_id=repo.id)
    version = get_version(session, repo=repo, ref=number)
    removed = list(
        session.scalars(
            select(Tag.name).where(Tag.version_id == version.id, Tag.name != LATEST).order_by(Tag.name)
        )
    )
    session.execute(delete(Tag).where(Tag.version_id == version.id))
    session.execute(delete(Version).where(Version.id == version.id))
    latest = _point_latest_at_newest(session, repo_id=repo.id, actor=actor)
    record_event(
        session,
        actor=actor,
        action="delete_version",
        target=repo.full_name,
        detail={"version": number, "removed_tags": removed},
    )
    return removed, latest


def _point_latest_at_newest(session: Session, *, repo_id: int, actor: str) -> int | None:
    """Move `latest` to the newest ready version; returns its number (None: no version left)."""
    newest = session.execute(
        select(Version.id, Version.number)
        .where(Version.repository_id == repo_id, Version.state == READY)
        .order_by(Version.number.desc())
        .limit(1)
    ).first()
    if newest is None:
        session.execute(delete(Tag).where(Tag.repository_id == repo_id, Tag.name == LATEST))
        return None
    _upsert_tag(session, repo_id=repo_id, name=LATEST, version_id=newest.id, actor=actor)
    return newest.number


# --- tags ------------------------------------------------------------------------------------
def _upsert_tag(session: Session, *, repo_id: int, name: str, version_id: int, actor: str) -> None:
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]
    now = utcnow()
    stmt = insert(Tag).values(
        repository_id=repo_id, name=name, version_id=version_id, updated_by=actor, updated_at=now
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[Tag.repository_id, Tag.name],
        set_={"version_id": version_id, "updated_by": actor, "updated_at": now},
    )
    session.execute(stmt)


def list_tags(session: Session, *, repo: Repository) -> list[Tag]:
    return list(session.scalars(select(Tag).where(Tag.repository_id == repo.id).order_by(Tag.name)))


def set_tag(session: Session, *, repo: Repository, name: str, number: int, actor: str) -> Tag:
    lock_repo(session, repo_id=repo.id)
    version = get_version(session, repo=repo, ref=number)
    _upsert_tag(session, repo_id=repo.id, name=name, version_id=version.id, actor=actor)
    record_event(
        session, actor=actor, action="tag", target=repo.full_name, detail={"tag": name, "version": number}
    )
    session.expire_all()
    return session.scalars(select(Tag).where(Tag.repository_id == repo.id, Tag.name == name)).one()


def delete_tag(session: Session, *, repo: Repository, name: str, actor: str) -> None:
    result = session.execute(delete(Tag).where(Tag.repository_id == repo.id, Tag.name == name))
    if result.rowcount == 0:
        raise NotFoundError(f"{repo.full_name} has no tag {name!r}")
    record_event(session, actor=actor, action="untag", target=repo.full_name, detail={"tag": name})


# --- blobs and uploads -----------------------------------------------------------------------
def get_blob(session: Session, *, digest: str) -> Blob | None:
    return session.get(Blob, digest)


def create_upload(
    session: Session,
    *,
    upload_id: str,
    repo: Repository,
    digest: str | None,
    size: int | None,
    raw_digest: str | None,
    raw_size: int,
    method: str,
    multipart_id: str | None,
    part_size: int | None,
    description: str,
    fidelity: dict | None,
    actor: str,
    expires_at: dt.datetime,
) -> Upload:
    version = Version(
        repository_id=repo.id,
        upload_id=upload_id,
        state=PENDING,
        created_by=actor,
        description=description,
        fidelity=fidelity,
    )
    upload = Upload(
        id=upload_id,
        version=version,
        digest=digest,
        size=size,
        raw_digest=raw_digest,
        raw_size=raw_size,
        method=method,
        multipart_id=multipart_id,
        part_size=part_size,
        created_by=actor,
        expires_at=expires_at,
    )
    session.add_all([version, upload])
    session.flush()
    return upload


def get_upload(session: Session, *, upload_id: str, for_update: bool = False) -> Upload:
    stmt = select(Upload).where(Upload.id == upload_id)
    if for_update and session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(of=Upload)
    upload = session.scalar(stmt)
    if upload is None:
        raise NotFoundError(f"upload {upload_id} does not exist (completed, aborted or expired)")
    return upload


def published_version(session: Session, *, upload_id: str) -> Version | None:
    """The ready version an upload was published as (its upload row is gone by then), if any."""
    return session.scalar(select(Version).where(Version.upload_id == upload_id, Version.state == READY))


def record_received(
    session: Session, *, upload_id: str, size: int, digest: str, raw_size: int, raw_digest: str, token: str
) -> None:
    """What bytes sent through the server turned out to be, verified as they arrived, and the
    staged file (`token`) that holds them."""
    session.execute(
        update(Upload)
        .where(Upload.id == upload_id)
        .values(
            received_size=size,
            received_digest=digest,
            received_raw_size=raw_size,
            received_raw_digest=raw_digest,
            received_token=token,
        )
    )


def delete_upload(session: Session, *, upload: Upload) -> None:
    """Drop an upload and its pending version (the version was never visible)."""
    session.execute(delete(Version).where(Version.id == upload.version_id, Version.state == PENDING))


def publish_version(
    session: Session,
    *,
    upload: Upload,
    store_key: str | None,
    codec: str,
    dtype: str,
    bits: int | None,
    size_ratio: float | None,
    fidelity: dict | None,
    header_metadata: dict,
    actor: str,
) -> Version:
    """The commit point of a push: record the blob (unless deduplicated: `store_key` None), number
    the version, mark it ready, move `latest`."""
    repo_id = upload.version.repository_id
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]
    if store_key is not None:
        # A concurrent push of the same bytes may have recorded them first; its copy wins and
        # ours becomes an orphan object that GC removes.
        session.execute(
            insert(Blob)
            .values(
                digest=upload.digest,
                store_key=store_key,
                size=upload.size,
                raw_digest=upload.raw_digest,
                raw_size=upload.raw_size,
                created_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=[Blob.digest])
        )
    # The counter row is the allocation lock: concurrent pushes queue here and get consecutive numbers.
    number = (
        session.execute(
            update(Repository)
            .where(Repository.id == repo_id)
            .values(next_version=Repository.next_version + 1)
            .returning(Repository.next_version)
        ).scalar_one()
        - 1
    )
    now = utcnow()
    session.execute(
        update(Version)
        .where(Version.id == upload.version_id, Version.state == PENDING)
        .values(
            state=READY,
            number=number,
            blob_digest=upload.digest,
            codec=codec,
            dtype=dtype,
            bits=bits,
            size_ratio=size_ratio,
            fidelity=fidelity,
            header_metadata=header_metadata,
            ready_at=now,
        )
    )
    session.execute(delete(Upload).where(Upload.id == upload.id))
    _upsert_tag(session, repo_id=repo_id, name=LATEST, version_id=upload.version_id, actor=actor)
    repo = session.get(Repository, repo_id)
    record_event(
        session,
        actor=actor,
        action="push",
        target=repo.full_name,
        detail={"version": number, "digest": upload.digest, "size": upload.size},
    )
    session.expire_all()
    return session.get(Version, upload.version_id)


def stale_uploads(session: Session, *, older_than: dt.datetime) -> list[Upload]:
    return list(session.scalars(select(Upload).where(Upload.created_at < older_than)))


def live_upload_ids(session: Session) -> set[str]:
    return set(session.scalars(select(Upload.id)))


def unreferenced_blobs(session: Session, *, older_than: dt.datetime) -> list[Blob]:
    return list(
        session.scalars(
            select(Blob).where(
                Blob.created_at < older_than,
                ~exists().where(Version.blob_digest == Blob.digest),
                ~exists().where(Upload.digest == Blob.digest),
            )
        )
    )


def delete_blob_if_unreferenced(session: Session, *, digest: str) -> bool:
    result = session.execute(
        delete(Blob).where(
            Blob.digest == digest,
            ~exists().where(Version.blob_digest == digest),
            ~exists().where(Upload.digest == digest),
        )
    )
    return result.rowcount == 1


def known_blob_keys(session: Session, *, keys: Sequence[str]) -> set[str]:
    return (
        set(session.scalars(select(Blob.store_key).where(Blob.store_key.in_(list(keys))))) if keys else set()
    )


# --- tokens ----------------------------------------------------------------------------------
def create_token(
    session: Session,
    *,
    name: str,
    scopes: Sequence[tuple[str, str]],
    actor: str,
    expires_at: dt.datetime | None = None,
) -> tuple[ApiToken, str]:
    secret = new_token_secret()
    token = ApiToken(
        name=name,
        token_hash=hash_token(secret),
        prefix=secret[:10],
        created_by=actor,
        expires_at=expires_at,
        scopes=[TokenScope(namespace=ns, permission=perm) for ns, perm in scopes],
    )
    session.add(token)
    session.flush()
    record_event(
        session,
        actor=actor,
        action="create_token",
        target=f"token:{name}",
        detail={"id": token.id, "scopes": [list(s) for s in scopes]},
    )
    return token, secret


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


def revoke_token(session: Session, *, token_id: int, actor: str) -> ApiToken:
    token = session.get(ApiToken, token_id)
    if token is None:
        raise NotFoundError(f"token {token_id} does not exist")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        record_event(
            session, actor=actor, action="revoke_token", target=f"token:{token.name}", detail={"id": token_id}
        )
    return token


def count_rows(session: Session, model) -> int:
    return session.scalar(select(func.count()).select_from(model))
