"""Tags: movable names for versions (`prod`, `v2`); `latest` is maintained by the server."""

from __future__ import annotations

from fastapi import APIRouter, status

from registry.common.errors import InvalidRequestError
from registry.common.names import RESERVED_TAGS
from registry.server import crud
from registry.server.api.views import require_read
from registry.server.deps import DatabaseDep, PrincipalDep, ReadSessionDep, RepoPath, SettingsDep, TagPath
from registry.server.schemas import TagOut, TagSet

router = APIRouter(prefix="/v1/repos/{namespace}/{name}/tags", tags=["tags"])


def _out(tag) -> TagOut:
    return TagOut(
        name=tag.name, version=tag.version.number, updated_by=tag.updated_by, updated_at=tag.updated_at
    )


def _not_reserved(tag: str) -> None:
    if tag in RESERVED_TAGS:
        raise InvalidRequestError(
            f"tag {tag!r} is maintained by the registry (it follows the newest version)"
        )


@router.get("", response_model=list[TagOut])
def list_tags(repo_name: RepoPath, session: ReadSessionDep, principal: PrincipalDep, settings: SettingsDep):
    repo = crud.get_repo(session, namespace=repo_name.namespace, name=repo_name.name)
    require_read(principal, settings, repo)
    return [_out(t) for t in crud.list_tags(session, repo=repo)]


@router.put("/{tag}", response_model=TagOut)
def set_tag(repo_name: RepoPath, tag: TagPath, body: TagSet, db: DatabaseDep, principal: PrincipalDep):
    """Point TAG at a version (creating or moving it)."""
    _not_reserved(tag)
    principal.require("write", repo_name.namespace)
    with db.write() as session:
        repo = crud.get_repo(session, namespace=repo_name.namespace, name=repo_name.name)
        return _out(crud.set_tag(session, repo=repo, name=tag, number=body.version, actor=principal.name))


@router.delete("/{tag}", status_code=status.HTTP_204_NO_CONTENT)
def delete_tag(repo_name: RepoPath, tag: TagPath, db: DatabaseDep, principal: PrincipalDep) -> None:
    _not_reserved(tag)
    principal.require("write", repo_name.namespace)
    with db.write() as session:
        repo = crud.get_repo(session, namespace=repo_name.namespace, name=repo_name.name)
        crud.delete_tag(session, repo=repo, name=tag, actor=principal.name)
