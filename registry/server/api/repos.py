"""Delta repositories `namespace/name`: create, list/search (cursor-paginated), show, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from registry.common import names
from registry.server import crud
from registry.server.api.views import repo_out, repos_out, require_read, visible_namespaces
from registry.server.deps import (
    DatabaseDep,
    PageLimit,
    PositionCursor,
    PrincipalDep,
    ReadSessionDep,
    RepoPath,
    SettingsDep,
)
from registry.server.schemas import Page, RepoCreate, RepoOut

router = APIRouter(prefix="/v1/repos", tags=["repositories"])


@router.get("", response_model=Page[RepoOut])
def list_repos(
    session: ReadSessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    limit: PageLimit,
    cursor: PositionCursor = None,
    base: Annotated[
        str | None,
        Query(
            description="Only repositories of this base model.",
            json_schema_extra={"pattern": names.BASE_NAME_PATTERN},
        ),
    ] = None,
    namespace: Annotated[
        str | None, Query(json_schema_extra={"pattern": names.SEGMENT_PATTERN, "maxLength": 64})
    ] = None,
    q: Annotated[
        str | None,
        Query(max_length=64, pattern=names.TEXT_PATTERN, description="Substring of namespace or name."),
    ] = None,
):
    if base is not None:
        names.parse_base_name(base)
    if namespace is not None:
        names.check_segment(namespace, what="namespace")
    rows, next_cursor = crud.list_repos(
        session,
        base_name=base,
        namespace=namespace,
        query=q,
        visible_namespaces=visible_namespaces(principal, settings),
        cursor=cursor,
        limit=limit,
    )
    return Page[RepoOut](items=repos_out(session, rows), next_cursor=next_cursor)


@router.post("", response_model=RepoOut, status_code=status.HTTP_201_CREATED)
def create_repo(body: RepoCreate, db: DatabaseDep, principal: PrincipalDep):
    namespace = names.check_segment(body.namespace, what="namespace")
    name = names.check_segment(body.name, what="repository name")
    base = names.parse_base_name(body.base)
    principal.require("write", namespace)
    with db.write() as session:
        repo = crud.create_repo(
            session,
            namespace=namespace,
            name=name,
            base_name=base,
            description=body.description,
            visibility=body.visibility,
            actor=principal.name,
        )
        return repo_out(repo, None)


@router.get("/{namespace}/{name}", response_model=RepoOut)
def show_repo(repo_name: RepoPath, session: ReadSessionDep, principal: PrincipalDep, settings: SettingsDep):
    repo = crud.get_repo(session, namespace=repo_name.namespace, name=repo_name.name)
    require_read(principal, settings, repo)
    return repos_out(session, [repo])[0]


@router.delete("/{namespace}/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_repo(repo_name: RepoPath, db: DatabaseDep, principal: PrincipalDep) -> None:
    # The docstring is this operation's OpenAPI description: kept on one line, byte for byte.
    """Delete the repository, its versions and tags (blobs go at the next GC). Needs admin in the namespace."""  # noqa: E501
    principal.require("admin", repo_name.namespace)
    with db.write() as session:
        repo = crud.get_repo(session, namespace=repo_name.namespace, name=repo_name.name)
        crud.delete_repo(session, repo=repo, actor=principal.name)
