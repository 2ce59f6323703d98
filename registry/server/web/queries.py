"""The reads the web pages need beyond `crud`: repositories of a base sorted by a column with
keyset cursors, repository counts per base, and the light per-version series the chart draws."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Float, func, literal, or_, select
from sqlalchemy.orm import Session, aliased

from registry.common.errors import InvalidRequestError
from registry.server import crud
from registry.server.models import READY, Blob, Repository, Tag, Version

#: Sort keys of a base's repository table; the first is the default.
REPO_SORTS = ("name", "updated", "size", "ratio", "created")
_DESCENDING = {"updated", "size", "ratio"}


def _visible(stmt, visible_namespaces: Sequence[str] | None):
    """The API's listing rule (crud.list_repos): public ones, plus private ones of these namespaces."""
    if visible_namespaces is None:
        return stmt
    return stmt.where(
        or_(Repository.visibility == "public", Repository.namespace.in_(list(visible_namespaces)))
    )


def repo_counts_by_base(
    session: Session, *, base_ids: Sequence[int], visible_namespaces: Sequence[str] | None
) -> dict[int, int]:
    """How many repositories the caller may see, per base id (one query)."""
    if not base_ids:
        return {}
    stmt = (
        select(Repository.base_model_id, func.count())
        .where(Repository.base_model_id.in_(list(base_ids)))
        .group_by(Repository.base_model_id)
    )
    return dict(session.execute(_visible(stmt, visible_namespaces)).all())


def list_repos_sorted(
    session: Session,
    *,
    base_id: int,
    visible_namespaces: Sequence[str] | None,
    sort: str,
    cursor: str | None,
    limit: int,
) -> tuple[list[Repository], str | None]:
    """Repositories of one base ordered by `sort` (REPO_SORTS; size, ratio and updated largest
    first, ties by id), `limit` a page, continued by the `cursor` of the previous page (the API's
    cursor encoding, holding [key, id])."""
    if sort not in REPO_SORTS:
        raise InvalidRequestError(f"unknown sort {sort!r}; use one of {', '.join(REPO_SORTS)}")
    latest_tag, latest, blob = aliased(Tag), aliased(Version), aliased(Blob)
    # A repository without versions has no size or ratio: coalesced below every real value, so it sorts last.
    key = {
        "name": Repository.namespace + "/" + Repository.name,
        "updated": func.coalesce(latest.ready_at, Repository.created_at),
        "size": func.coalesce(blob.size, -1),
        "ratio": func.coalesce(latest.size_ratio, literal(-1.0, Float)),
        "created": Repository.id,
    }[sort]
    stmt = _visible(
        select(Repository, key.label("sort_key"))
        .outerjoin(latest_tag, (latest_tag.repository_id == Repository.id) & (latest_tag.name == crud.LATEST))
        .outerjoin(latest, latest.id == latest_tag.version_id)
        .outerjoin(blob, blob.digest == latest.blob_digest)
        .where(Repository.base_model_id == base_id),
        visible_namespaces,
    )
    descending = sort in _DESCENDING
    if cursor:
        after_key, after_id = _repo_cursor(crud.decode_cursor(cursor), sort)
        beyond = key < after_key if descending else key > after_key
        stmt = stmt.where(or_(beyond, (key == after_key) & (Repository.id > after_id)))
    stmt = stmt.order_by(key.desc() if descending else key, Repository.id).limit(limit + 1)
    rows = session.execute(stmt).all()
    page = [repo for repo, _ in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last_key = rows[limit - 1][1]
        if isinstance(last_key, dt.datetime):
            last_key = (
                last_key.astimezone(dt.timezone.utc).isoformat()
                if last_key.tzinfo
                else last_key.isoformat() + "+00:00"
            )
        next_cursor = crud.encode_cursor([last_key, page[-1].id])
    return page, next_cursor


def _repo_cursor(value: Any, sort: str) -> tuple[Any, int]:
    """[key, id] of a decoded cursor, checked: a forged cursor is a 400, never a 500."""
    ok = isinstance(value, list) and len(value) == 2 and type(value[1]) is int and 0 <= value[1] < 2**31
    key = value[0] if ok else None
    if ok and sort == "updated":
        try:
            key = dt.datetime.fromisoformat(key)
            ok = key.tzinfo is not None
        except (TypeError, ValueError):
            ok = False
    elif ok and sort == "name":
        ok = isinstance(key, str) and len(key) <= 200
    elif ok and sort in ("size", "created"):
        ok = type(key) is int and -1 <= key < 2**63
    elif ok and sort == "ratio":
        ok = type(key) in (int, float) and abs(key) < 1e300
    if not ok:
        raise InvalidRequestError("invalid cursor")
    return key, value[1]


def tags_by_repo(session: Session, *, repo_ids: Sequence[int]) -> dict[int, list[tuple[str, int]]]:
    """(tag, version number) pairs by name, per repository id (one query)."""
    out: dict[int, list[tuple[str, int]]] = {}
    if repo_ids:
        for repo_id, name, number in session.execute(
            select(Tag.repository_id, Tag.name, Version.number)
            .join(Version, Version.id == Tag.version_id)
            .where(Tag.repository_id.in_(list(repo_ids)))
            .order_by(Tag.name)
        ):
            out.setdefault(repo_id, []).append((name, number))
    return out


def version_series(
    session: Session, *, repo: Repository, limit: int
) -> list[tuple[int, float | None, dict | None]]:
    """(number, size ratio, fidelity) of the newest `limit` ready versions, oldest first (the chart)."""
    rows = session.execute(
        select(Version.number, Version.size_ratio, Version.fidelity)
        .where(Version.repository_id == repo.id, Version.state == READY)
        .order_by(Version.number.desc())
        .limit(limit)
    ).all()
    return [(number, ratio, fidelity) for number, ratio, fidelity in reversed(rows)]


def count_versions(session: Session, *, repo: Repository) -> int:
    return session.scalar(
        select(func.count())
        .select_from(Version)
        .where(Version.repository_id == repo.id, Version.state == READY)
    )
