"""FastAPI dependencies: the app's state, sessions, the calling principal, and validated path names.

def show(repo: RepoPath, session: ReadSessionDep, principal: PrincipalDep): ...
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Path, Query, Request
from sqlalchemy.orm import Session

from registry.common import names
from registry.server.auth import LOCAL_USER, Principal, authenticate
from registry.server.blobstores import BlobStore
from registry.server.db import Database
from registry.server.metrics import RegistryMetrics
from registry.server.settings import Settings
from registry.server.uploads import PushService


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


# Names are checked by the `names` validators (400 invalid_name); the patterns only document them.
def _documented(pattern: str, max_length: int) -> dict:
    return {"pattern": pattern, "maxLength": max_length}


Segment = Annotated[str, Path(json_schema_extra=_documented(names.SEGMENT_PATTERN, 64))]
BaseSegment = Annotated[str, Path(json_schema_extra=_documented(names.BASE_SEGMENT_PATTERN, 96))]


def repo_path(namespace: Segment, name: Segment) -> RepoName:
    return RepoName(
        names.check_segment(namespace, what="namespace"), names.check_segment(name, what="repository name")
    )


def base_path(org: BaseSegment, model: BaseSegment) -> str:
    return names.parse_base_name(f"{org}/{model}")


def version_ref(
    ref: Annotated[
        str,
        Path(
            description="A version number or a tag (latest, prod, ...).",
            json_schema_extra=_documented(names.REF_PATTERN, 64),
        ),
    ],
) -> int | str:
    return names.parse_version_ref(ref)


def version_number(
    ref: Annotated[
        str, Path(description="A version number.", json_schema_extra=_documented("^[1-9][0-9]{0,8}$", 10))
    ],
) -> int | str:
    return names.parse_version_ref(ref)


def tag_path(tag: Annotated[str, Path(json_schema_extra=_documented(names.TAG_PATTERN, 64))]) -> str:
    return names.check_tag(tag)


def page_limit(state: StateDep, limit: Annotated[int | None, Query(ge=1)] = None) -> int:
    return min(limit or state.settings.page_size, state.settings.max_page_size)


RepoPath = Annotated[RepoName, Depends(repo_path)]
BasePath = Annotated[str, Depends(base_path)]
VersionRef = Annotated[int | str, Depends(version_ref)]
VersionNumber = Annotated[int | str, Depends(version_number)]
TagPath = Annotated[str, Depends(tag_path)]
PageLimit = Annotated[int, Depends(page_limit)]
#: The API listings' cursor (crud.encode_position): every string the schema allows is a position.
PositionCursor = Annotated[
    str | None,
    Query(
        max_length=20,
        json_schema_extra={"pattern": "^[0-9]*$"},
        description=(
            "The next_cursor of the previous page: the position (decimal) the next page starts "
            "after. Empty or absent: the first page."
        ),
    ),
]
#: An opaque cursor (crud.encode_cursor), for listings whose position is more than one number.
Cursor = Annotated[
    str | None,
    Query(
        max_length=200,
        json_schema_extra={"pattern": "^[A-Za-z0-9_-]*$"},
        description="The next_cursor of the previous page.",
    ),
]
