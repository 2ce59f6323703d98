"""FastAPI dependencies: the app's state, sessions, the calling principal, and validated path names.

    def show(repo: RepoPath, session: ReadSessionDep, principal: PrincipalDep): ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Iterator

from fastapi import Depends, Header, Path, Query, Request
from sqlalchemy.orm import Session

from . import names
from .auth import LOCAL_USER, Principal, authenticate
from .blobstores import BlobStore
from .db import Database
from .metrics import RegistryMetrics
from .push import PushService
from .settings import Settings


@dataclass
class AppState:
    settings: Settings
    db: Database
    store: BlobStore
    metrics: RegistryMetrics
    pushes: PushService


def get_state(request: Request) -> AppState:
    return request.app.state.registry


StateDep = Annotated[AppState, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    return state.settings


def get_db(state: StateDep) -> Database:
    return state.db


def get_read_session(state: StateDep) -> Iterator[Session]:
    """A read-only session, closed as soon as the handler returns (scope "function"), so a long
    download holds no connection. Writes open their own `db.write()` transaction inside the
    handler, so the commit happens before the response is sent."""
    with state.db.read() as session:
        yield session


def get_principal(
    state: StateDep, authorization: Annotated[str | None, Header(include_in_schema=False)] = None
) -> Principal:
    if not state.settings.auth_enabled:
        return LOCAL_USER  # no token lookup, no database round trip
    with state.db.read() as session:
        return authenticate(session, state.settings, authorization)


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_db)]
ReadSessionDep = Annotated[Session, Depends(get_read_session, scope="function")]
PrincipalDep = Annotated[Principal, Depends(get_principal)]


@dataclass(frozen=True)
class RepoName:
    namespace: str
    name: str

    @property
    def full(self) -> str:
        return f"{self.namespace}/{self.name}"


def repo_path(namespace: Annotated[str, Path()], name: Annotated[str, Path()]) -> RepoName:
    return RepoName(names.check_segment(namespace, what="namespace"), names.check_segment(name, what="repository name"))


def base_path(org: Annotated[str, Path()], model: Annotated[str, Path()]) -> str:
    return names.parse_base_name(f"{org}/{model}")


def version_ref(ref: Annotated[str, Path(description="A version number or a tag (latest, prod, ...).")]) -> int | str:
    return names.parse_version_ref(ref)


def tag_path(tag: Annotated[str, Path()]) -> str:
    return names.check_tag(tag)


def page_limit(state: StateDep, limit: Annotated[int | None, Query(ge=1)] = None) -> int:
    return min(limit or state.settings.page_size, state.settings.max_page_size)


RepoPath = Annotated[RepoName, Depends(repo_path)]
BasePath = Annotated[str, Depends(base_path)]
VersionRef = Annotated[int | str, Depends(version_ref)]
TagPath = Annotated[str, Depends(tag_path)]
PageLimit = Annotated[int, Depends(page_limit)]
Cursor = Annotated[str | None, Query(max_length=200)]
