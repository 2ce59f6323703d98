"""Bearer-token authentication and the permission rule: a token holds scopes
(`read` < `write` < `admin`) per namespace, `*` meaning every namespace.

    principal.require("write", "acme")    # AuthenticationError (401) / PermissionDeniedError (403)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.common.errors import AuthenticationError, PermissionDeniedError
from registry.server.models import ApiToken, utcnow
from registry.server.settings import Settings

TOKEN_PREFIX = "dst_"
LEVEL = {"read": 1, "write": 2, "admin": 3}
ALL_NAMESPACES = "*"


def new_token_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(secret: str) -> str:
    """Tokens are stored as their sha256: they are random, so a fast hash is enough."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling and what they may do."""

    name: str
    scopes: dict[str, str] = field(default_factory=dict)  # namespace -> permission
    authenticated: bool = True
    token_id: int | None = None

    def level_in(self, namespace: str) -> int:
        return max(
            LEVEL.get(self.scopes.get(namespace, ""), 0), LEVEL.get(self.scopes.get(ALL_NAMESPACES, ""), 0)
        )

    def can(self, permission: str, namespace: str) -> bool:
        return self.level_in(namespace) >= LEVEL[permission]

    @property
    def is_admin(self) -> bool:
        return LEVEL.get(self.scopes.get(ALL_NAMESPACES, ""), 0) >= LEVEL["admin"]

    def require(self, permission: str, namespace: str) -> None:
        if self.can(permission, namespace):
            return
        if not self.authenticated:
            raise AuthenticationError(
                f"this needs a token with {permission} access to namespace "
                f"{namespace!r}; send 'Authorization: Bearer <token>'"
            )
        raise PermissionDeniedError(f"{self.name} has no {permission} access to namespace {namespace!r}")

    def require_admin(self) -> None:
        if self.is_admin:
            return
        if not self.authenticated:
            raise AuthenticationError("this needs an admin token; send 'Authorization: Bearer <token>'")
        raise PermissionDeniedError(f"{self.name} is not an administrator")


LOCAL_USER = Principal(name="local", scopes={ALL_NAMESPACES: "admin"}, authenticated=False)
ANONYMOUS = Principal(name="anonymous", authenticated=False)


def authenticate(session: Session, settings: Settings, authorization: str | None) -> Principal:
    """Resolve an `Authorization` header to a Principal (auth off: everyone is the local admin)."""
    if not settings.auth_enabled:
        return LOCAL_USER
    if not authorization:
        return ANONYMOUS
    scheme, _, secret = authorization.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise AuthenticationError("malformed Authorization header; expected 'Bearer <token>'")
    admin = settings.admin_token.get_secret_value() if settings.admin_token else None
    if admin and hmac.compare_digest(secret.encode(), admin.encode()):
        return Principal(name="admin", scopes={ALL_NAMESPACES: "admin"})
    # The lookup is by sha256 of the secret, so its timing reveals nothing about stored secrets.
    token = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(secret)))
    if token is None or token.revoked_at is not None:
        raise AuthenticationError("unknown or revoked token")
    if token.expires_at is not None and token.expires_at <= utcnow():
        raise AuthenticationError("token expired; ask an administrator for a new one")
    return Principal(
        name=f"token:{token.name}",
        scopes={s.namespace: s.permission for s in token.scopes},
        token_id=token.id,
    )
