"""Versions of a repository: list, show by number or tag, download, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status
from fastapi.responses import FileResponse, RedirectResponse

from registry.common import names
from registry.common.errors import InvalidRequestError
from registry.server import crud
from registry.server.api.views import require_read, versions_out
from registry.server.deps import (
    DatabaseDep,
    PageLimit,
    PositionCursor,
    PrincipalDep,
    ReadSessionDep,
    RepoPath,
    SettingsDep,
    StateDep,
    VersionNumber,
    VersionRef,
)
from registry.server.schemas import Page, VersionDeleted, VersionOut

router = APIRouter(prefix="/v1/repos/{namespace}/{name}/versions", tags=["versions"])


@router.get("", response_model=Page[VersionOut])
def list_versions(
    repo_name: RepoPath,
    session: ReadSessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    limit: PageLimit,
    cursor: PositionCursor = None,
    digest: Annotated[
        str | None,
        Query(
            pattern=names.DIGEST_PATTERN,
            description="Only the version whose stored blob has this digest (a ref `ns/name@sha256:…`).",
        ),
    ] = None,
):
    """Ready versions, newest first; with `digest`, those whose stored bytes have that sha256."""
    repo = crud.get_repo(session, namespace=repo_name.namespace, name=repo_name.name)
    require_read(principal, settings, repo)
    rows, next_cursor = crud.list_versions(session, repo=repo, cursor=cursor, limit=limit, digest=digest)
    return Page[VersionOut](items=versions_out(session, rows), next_cursor=next_cursor)


@router.get("/{ref}", response_model=VersionOut)
def show_version(
    repo_name: RepoPath,
    ref: VersionRef,
    session: ReadSessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
):
    repo = crud.get_repo(session, namespace=repo_name.namespace, name=repo_name.name)
    require_read(principal, settings, repo)
    return versions_out(session, [crud.get_version(session, repo=repo, ref=ref)])[0]


_DOWNLOAD_RESPONSES = {200: {"content": {"application/zstd": {}}}, 206: {}, 304: {}, 307: {}, 416: {}}


@router.head(
    "/{ref}/download", response_class=Response, operation_id="head_version_download", include_in_schema=False
)
@router.get(
    "/{ref}/download", response_class=Response, operation_id="download_version", responses=_DOWNLOAD_RESPONSES
)
def download_version(
    repo_name: RepoPath,
    ref: VersionRef,
    session: ReadSessionDep,
    principal: PrincipalDep,
    state: StateDep,
    if_none_match: Annotated[str | None, Header()] = None,
):
    """The stored zstd blob: a redirect to a presigned URL (S3) or the bytes themselves, with
    `Content-Length`, `ETag` = digest and Range support. Decompress and check `X-Deltastore-Raw-Digest`."""
    repo = crud.get_repo(session, namespace=repo_name.namespace, name=repo_name.name)
    require_read(principal, state.settings, repo)
    version = crud.get_version(session, repo=repo, ref=ref)
    blob = version.blob
    etag = f'"{blob.digest}"'
    headers = {
        "ETag": etag,
        "Cache-Control": "no-cache",
        "X-Deltastore-Digest": blob.digest,
        "X-Deltastore-Raw-Digest": blob.raw_digest,
        "X-Deltastore-Raw-Size": str(blob.raw_size),
        "X-Deltastore-Version": str(version.number),
    }
    if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    filename = f"{repo.namespace}-{repo.name}-v{version.number}.bdelta.zst"
    target = state.store.download(blob.store_key, filename=filename)
    if target.url is not None:
        return RedirectResponse(target.url, status_code=status.HTTP_307_TEMPORARY_REDIRECT, headers=headers)
    return FileResponse(target.path, media_type="application/zstd", filename=filename, headers=headers)


@router.delete("/{ref}", response_model=VersionDeleted)
def delete_version(repo_name: RepoPath, ref: VersionNumber, db: DatabaseDep, principal: PrincipalDep):
    """Delete one version by number, and the tags that point at it (the answer lists them);
    `latest` moves back to the newest remaining version."""
    if not isinstance(ref, int):
        raise InvalidRequestError("delete a version by its number, not by a tag")
    principal.require("write", repo_name.namespace)
    with db.write() as session:
        repo = crud.get_repo(session, namespace=repo_name.namespace, name=repo_name.name)
        removed, latest = crud.delete_version(session, repo=repo, number=ref, actor=principal.name)
    return VersionDeleted(repository=repo_name.full, number=ref, removed_tags=removed, latest=latest)
