"""Model -> response conversions and the read-permission rule shared by the routers."""

from __future__ import annotations

from sqlalchemy.orm import Session

from registry.common.errors import AuthenticationError
from registry.server import crud
from registry.server.auth import ALL_NAMESPACES, Principal
from registry.server.models import Repository, Version
from registry.server.schemas import LatestVersionOut, RepoOut, VersionOut
from registry.server.settings import Settings


def require_read(principal: Principal, settings: Settings, repo: Repository) -> None:
    """Public repositories are readable by anyone allowed to read at all; private ones need a read scope."""
    if repo.visibility == "public" and (
        principal.authenticated or not settings.auth_enabled or settings.anonymous_read
    ):
        return
    principal.require("read", repo.namespace)


def visible_namespaces(principal: Principal, settings: Settings) -> list[str] | None:
    """Namespaces whose private repositories the principal may list (None: all of them)."""
    if not settings.auth_enabled or ALL_NAMESPACES in principal.scopes:
        return None
    if not principal.authenticated and not settings.anonymous_read:
        raise AuthenticationError("this registry needs a token to read; send 'Authorization: Bearer <token>'")
    return list(principal.scopes)


def repo_out(repo: Repository, latest: Version | None) -> RepoOut:
    summary = None
    if latest is not None:
        summary = LatestVersionOut(
            number=latest.number,
            digest=latest.blob.digest,
            size=latest.blob.size,
            raw_size=latest.blob.raw_size,
            codec=latest.codec,
            size_ratio=latest.size_ratio,
            ready_at=latest.ready_at,
        )
    return RepoOut(
        namespace=repo.namespace,
        name=repo.name,
        full_name=repo.full_name,
        base=repo.base_model.name,
        base_fingerprint=repo.base_model.fingerprint,
        description=repo.description,
        visibility=repo.visibility,
        latest_version=latest.number if latest is not None else None,
        latest=summary,
        created_by=repo.created_by,
        created_at=repo.created_at,
    )


def repos_out(session: Session, repos: list[Repository]) -> list[RepoOut]:
    latest = crud.latest_versions(session, repo_ids=[r.id for r in repos])
    return [repo_out(r, latest.get(r.id)) for r in repos]


def download_path(repo: Repository, number: int) -> str:
    return f"/v1/repos/{repo.namespace}/{repo.name}/versions/{number}/download"


def version_out(version: Version, tags: list[str]) -> VersionOut:
    repo, blob = version.repository, version.blob
    return VersionOut(
        repository=repo.full_name,
        number=version.number,
        tags=tags,
        digest=blob.digest,
        size=blob.size,
        raw_digest=blob.raw_digest,
        raw_size=blob.raw_size,
        codec=version.codec,
        dtype=version.dtype,
        bits=version.bits,
        size_ratio=version.size_ratio,
        fidelity=version.fidelity,
        metadata=version.header_metadata,
        description=version.description,
        created_by=version.created_by,
        created_at=version.created_at,
        ready_at=version.ready_at,
        download_url=download_path(repo, version.number),
    )


def versions_out(session: Session, versions: list[Version]) -> list[VersionOut]:
    tags = crud.tags_by_version(session, version_ids=[v.id for v in versions])
    return [version_out(v, tags.get(v.id, [])) for v in versions]
