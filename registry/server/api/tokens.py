"""API tokens (admin only) and `whoami`."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Path, status

from registry.common import names
from registry.server import crud
from registry.server.auth import ALL_NAMESPACES, LEVEL
from registry.server.deps import DatabaseDep, PrincipalDep, ReadSessionDep, SettingsDep
from registry.server.models import utcnow
from registry.server.schemas import ScopeIn, TokenCreate, TokenCreated, TokenOut, WhoAmI

router = APIRouter(prefix="/v1", tags=["tokens"])


def _out(token) -> dict:
    return dict(
        id=token.id,
        name=token.name,
        prefix=token.prefix,
        created_by=token.created_by,
        created_at=token.created_at,
        revoked_at=token.revoked_at,
        expires_at=token.expires_at,
        scopes=[ScopeIn(namespace=s.namespace, permission=s.permission) for s in token.scopes],
    )


@router.post("/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create_token(body: TokenCreate, db: DatabaseDep, principal: PrincipalDep):
    """Create a token; the secret is in the response and is never shown again."""
    principal.require_admin()
    granted: dict[str, str] = {}
    for scope in body.scopes:
        if scope.namespace != ALL_NAMESPACES:
            names.check_segment(scope.namespace, what="namespace")
        # a namespace listed twice gets the higher of its permissions
        if LEVEL[scope.permission] > LEVEL.get(granted.get(scope.namespace, ""), 0):
            granted[scope.namespace] = scope.permission
    scopes = list(granted.items())
    expires_at = utcnow() + dt.timedelta(seconds=body.expires_in_seconds) if body.expires_in_seconds else None
    with db.write() as session:
        token, secret = crud.create_token(
            session, name=body.name, scopes=scopes, actor=principal.name, expires_at=expires_at
        )
        return TokenCreated(token=secret, **_out(token))


@router.get("/tokens", response_model=list[TokenOut])
def list_tokens(session: ReadSessionDep, principal: PrincipalDep):
    principal.require_admin()
    return [TokenOut(**_out(t)) for t in crud.list_tokens(session)]


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_token(
    token_id: Annotated[int, Path(ge=1, le=2**31 - 1)], db: DatabaseDep, principal: PrincipalDep
) -> None:
    principal.require_admin()
    with db.write() as session:
        crud.revoke_token(session, token_id=token_id, actor=principal.name)


@router.get("/whoami", response_model=WhoAmI)
def whoami(principal: PrincipalDep, settings: SettingsDep):
    return WhoAmI(
        name=principal.name,
        authenticated=principal.authenticated,
        scopes=principal.scopes,
        auth_enabled=settings.auth_enabled,
    )
