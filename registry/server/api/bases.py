"""Base models: register, list, show, remove, and the delta repositories of one base."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from registry.common import names
from registry.server import crud
from registry.server.api.views import repos_out, visible_namespaces
from registry.server.deps import (
    BasePath,
    DatabaseDep,
    PageLimit,
    PositionCursor,
    PrincipalDep,
    ReadSessionDep,
    SettingsDep,
)
from registry.server.schemas import BaseCreate, BaseOut, Page, RepoOut

router = APIRouter(prefix="/v1/bases", tags=["bases"])


@router.get("", response_model=Page[BaseOut])
def list_bases(
    session: ReadSessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    limit: PageLimit,
    cursor: PositionCursor = None,
):
    visible_namespaces(principal, settings)
    rows, next_cursor = crud.list_bases(session, cursor=cursor, limit=limit)
    return Page[BaseOut](items=[BaseOut.model_validate(b) for b in rows], next_cursor=next_cursor)


@router.post(
    "",
    response_model=BaseOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": BaseOut, "description": "Already registered with this fingerprint (idempotent)"}
    },
)
def register_base(body: BaseCreate, db: DatabaseDep, principal: PrincipalDep, response: Response):
    """Register a base model by name and weight fingerprint (idempotent for the same pair)."""
    name = names.parse_base_name(body.name)
    principal.require("write", names.base_namespace(name))
    with db.write() as session:
        base, created = crud.create_base(
            session,
            name=name,
            fingerprint=body.fingerprint,
            architecture=body.architecture,
            parameter_count=body.parameter_count,
            config=body.config,
            actor=principal.name,
        )
        out = BaseOut.model_validate(base)
    if not created:
        response.status_code = status.HTTP_200_OK
    return out


@router.get("/{org}/{model}", response_model=BaseOut)
def show_base(base_name: BasePath, session: ReadSessionDep, principal: PrincipalDep, settings: SettingsDep):
    visible_namespaces(principal, settings)
    return BaseOut.model_validate(crud.get_base(session, name=base_name))


@router.delete("/{org}/{model}", status_code=status.HTTP_204_NO_CONTENT)
def delete_base(base_name: BasePath, db: DatabaseDep, principal: PrincipalDep) -> None:
    """Remove a base registered by mistake (needs admin in its namespace); refused with 409 while
    any repository holds deltas of it."""
    principal.require("admin", names.base_namespace(base_name))
    with db.write() as session:
        crud.delete_base(session, name=base_name, actor=principal.name)


@router.get("/{org}/{model}/repos", response_model=Page[RepoOut])
def list_base_repos(
    base_name: BasePath,
    session: ReadSessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    limit: PageLimit,
    cursor: PositionCursor = None,
):
    """The delta repositories made against this base."""
    rows, next_cursor = crud.list_repos(
        session,
        base_name=base_name,
        visible_namespaces=visible_namespaces(principal, settings),
        cursor=cursor,
        limit=limit,
    )
    return Page[RepoOut](items=repos_out(session, rows), next_cursor=next_cursor)
