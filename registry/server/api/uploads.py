"""Uploads: the two-phase push. Declare the blob, send its bytes (through the server for the local
store, to presigned S3 URLs otherwise), then complete to publish the version."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Header, Path, Request, Response, status
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from registry.common.errors import (
    ConflictError,
    DigestMismatchError,
    InvalidRequestError,
    SizeMismatchError,
    UploadTooLargeError,
)
from registry.server import crud
from registry.server.api.views import versions_out
from registry.server.deps import PrincipalDep, RepoPath, StateDep
from registry.server.models import Version
from registry.server.schemas import UploadCreate, UploadOut, UploadPartOut, UploadReceived, VersionOut
from registry.server.uploads import UploadRequest

router = APIRouter(tags=["uploads"])
UploadId = Annotated[str, Path(pattern="^[0-9a-f]{32}$")]
_WRITE_BATCH = 1 << 20


@router.post(
    "/v1/repos/{namespace}/{name}/uploads", response_model=UploadOut, status_code=status.HTTP_201_CREATED
)
def create_upload(repo_name: RepoPath, body: UploadCreate, state: StateDep, principal: PrincipalDep):
    """Declare a push. Over-limit sizes are refused here (413), before any byte is sent; bytes the
    registry already holds come back as `exists` (skip sending them)."""
    upload, target = state.pushes.create(
        namespace=repo_name.namespace,
        name=repo_name.name,
        principal=principal,
        request=UploadRequest(
            digest=body.digest,
            size=body.size,
            raw_digest=body.raw_digest,
            raw_size=body.raw_size,
            description=body.description,
            fidelity=body.fidelity,
        ),
    )
    return _upload_out(upload, target, repo_name.full)


@router.get("/v1/uploads/{upload_id}", response_model=UploadOut)
def resume_upload(upload_id: UploadId, state: StateDep, principal: PrincipalDep):
    """A pending upload again, to resume an interrupted push: fresh presigned URLs and, for
    `s3-multipart`, which parts the store already holds (`received`), so only the others are sent."""
    upload, target = state.pushes.resume(upload_id=upload_id, principal=principal)
    return _upload_out(upload, target, upload.version.repository.full_name)


def _upload_out(upload, target, repository: str) -> UploadOut:
    return UploadOut(
        id=upload.id,
        repository=repository,
        method=target.method,
        exists=target.method == "exists",
        upload_url=f"/v1/uploads/{upload.id}" if target.method == "stream" else target.url,
        parts=[
            UploadPartOut(number=p.number, url=p.url, offset=p.offset, size=p.size, received=p.received)
            for p in target.parts
        ],
        part_size=target.part_size,
        complete_url=f"/v1/uploads/{upload.id}/complete",
        expires_at=upload.expires_at,
    )


_BLOB_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.put("/v1/uploads/{upload_id}", response_model=UploadReceived, openapi_extra=_BLOB_BODY)
async def send_upload_bytes(
    upload_id: UploadId,
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    content_length: Annotated[int | None, Header(include_in_schema=False)] = None,
):
    """Stream the blob's bytes (local store). Written to a temporary file while hashed, never held
    in memory; more bytes than declared are refused as they arrive."""
    upload = await run_in_threadpool(state.pushes.get, upload_id=upload_id, principal=principal)
    if upload.method != "stream":
        raise ConflictError(f"upload {upload_id} takes no bytes here (method {upload.method})")
    if content_length is not None:
        if content_length > state.settings.max_upload_bytes:
            raise UploadTooLargeError(
                f"{content_length} bytes exceed this registry's limit of {state.settings.max_upload_bytes}"
            )
        if content_length != upload.size:
            raise SizeMismatchError(
                f"request has {content_length} bytes but the upload declared {upload.size}"
            )
    sha = hashlib.sha256()
    received = 0

    def write(fh, data: bytes) -> None:
        sha.update(data)
        fh.write(data)

    try:
        with state.store.staging_writer(upload_id) as fh:
            pending = bytearray()
            async for chunk in request.stream():
                received += len(chunk)
                if received > upload.size:
                    raise SizeMismatchError(f"received more than the {upload.size} bytes the upload declared")
                pending += chunk
                if len(pending) >= _WRITE_BATCH:  # file writes and hashing run off the event loop
                    await run_in_threadpool(write, fh, bytes(pending))
                    pending.clear()
            if pending:
                await run_in_threadpool(write, fh, bytes(pending))
            if received != upload.size:
                raise SizeMismatchError(f"received {received} bytes but the upload declared {upload.size}")
    except ClientDisconnect:
        raise InvalidRequestError(f"upload {upload_id} was interrupted after {received} bytes") from None
    digest = "sha256:" + sha.hexdigest()
    with state.db.write() as session:
        crud.record_received(session, upload_id=upload_id, size=received, digest=digest)
    if digest != upload.digest:
        raise DigestMismatchError(
            f"received bytes have digest {digest}, but the upload declared {upload.digest}"
        )
    return UploadReceived(id=upload_id, received=received, digest=digest)


@router.post(
    "/v1/uploads/{upload_id}/complete",
    response_model=VersionOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        status.HTTP_200_OK: {
            "model": VersionOut,
            "description": "The upload was published already (a repeated "
            "`complete`, e.g. after a lost answer): the same version, nothing new published",
        }
    },
)
def complete_upload(upload_id: UploadId, state: StateDep, principal: PrincipalDep, response: Response):
    """Verify the stored bytes (size, sha256, one zstd frame, format-v1 header of the repository's
    base) and publish the version: it gets the next number and `latest` moves to it (201).
    Completing an upload that was published already answers 200 with that same version, so a
    client that lost the first answer may simply call `complete` again."""
    version, published = state.pushes.complete(upload_id=upload_id, principal=principal)
    if not published:
        response.status_code = status.HTTP_200_OK
    with state.db.read() as session:
        return versions_out(session, [session.get(Version, version.id)])[0]


@router.delete("/v1/uploads/{upload_id}", status_code=status.HTTP_204_NO_CONTENT)
def abort_upload(upload_id: UploadId, state: StateDep, principal: PrincipalDep) -> None:
    state.pushes.abort(upload_id=upload_id, principal=principal)
