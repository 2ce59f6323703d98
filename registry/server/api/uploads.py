"""Uploads: the two-phase push. Declare the blob, send its bytes as they are made (through the
server for the local store, verified as they arrive; to presigned S3 URLs otherwise, part URLs
asked for in batches), then complete, naming the digests and sizes, to publish the version."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from typing import IO, Annotated

from fastapi import APIRouter, Body, Header, Path, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from registry.common.errors import (
    ConflictError,
    InvalidRequestError,
    SizeMismatchError,
    UploadTooLargeError,
)
from registry.server.api.views import versions_out
from registry.server.deps import PrincipalDep, RepoPath, StateDep
from registry.server.models import Version
from registry.server.schemas import (
    ReceivedPartOut,
    UploadComplete,
    UploadCreate,
    UploadOut,
    UploadPartOut,
    UploadPartsOut,
    UploadReceived,
    VersionOut,
)
from registry.server.uploads import MAX_PART_BATCH, UploadRequest
from registry.server.verify import Declared

router = APIRouter(tags=["uploads"])
UploadId = Annotated[str, Path(pattern="^[0-9a-f]{32}$")]
_WRITE_BATCH = 1 << 20


@router.post(
    "/v1/repos/{namespace}/{name}/uploads", response_model=UploadOut, status_code=status.HTTP_201_CREATED
)
def create_upload(repo_name: RepoPath, body: UploadCreate, state: StateDep, principal: PrincipalDep):
    """Declare a push: the raw size, and the stored digest and size when the client knows them
    already. Over-limit sizes are refused here (413), before any byte is sent; bytes the registry
    already holds come back as `exists` (skip sending them)."""
    upload, target = state.pushes.create(
        namespace=repo_name.namespace,
        name=repo_name.name,
        principal=principal,
        request=UploadRequest(
            raw_size=body.raw_size,
            digest=body.digest,
            size=body.size,
            raw_digest=body.raw_digest,
            description=body.description,
            fidelity=body.fidelity,
        ),
    )
    return _upload_out(upload, target, repo_name.full)


@router.get("/v1/uploads/{upload_id}", response_model=UploadOut)
def resume_upload(upload_id: UploadId, state: StateDep, principal: PrincipalDep):
    """A pending upload again, to resume an interrupted push: a fresh presigned URL or, for
    `s3-multipart`, which parts the store already holds (`received_parts`), so only the others
    are sent."""
    upload, target = state.pushes.resume(upload_id=upload_id, principal=principal)
    return _upload_out(upload, target, upload.version.repository.full_name)


def _upload_out(upload, target, repository: str) -> UploadOut:
    return UploadOut(
        id=upload.id,
        repository=repository,
        method=target.method,
        exists=target.method == "exists",
        upload_url=f"/v1/uploads/{upload.id}" if target.method == "stream" else target.url,
        parts_url=f"/v1/uploads/{upload.id}/parts" if target.method == "s3-multipart" else None,
        part_size=target.part_size,
        received_parts=[ReceivedPartOut(number=p.number, size=p.size, etag=p.etag) for p in target.received],
        complete_url=f"/v1/uploads/{upload.id}/complete",
        expires_at=upload.expires_at,
    )


@router.get("/v1/uploads/{upload_id}/parts", response_model=UploadPartsOut)
def part_urls(
    upload_id: UploadId,
    state: StateDep,
    principal: PrincipalDep,
    first: Annotated[int, Query(ge=1, le=10_000)] = 1,
    count: Annotated[int, Query(ge=1, le=MAX_PART_BATCH)] = 16,
):
    """Presigned URLs for parts `first` .. `first + count - 1` of an `s3-multipart` upload, asked
    for in batches as the client makes the parts, as far as the most bytes the upload may bring
    reach (what its raw size can compress to, within the registry's limit): fewer than `count`
    near the end, and a `first` past them is refused (413). An upload of another method has
    none (an empty list)."""
    parts = state.pushes.part_urls(upload_id=upload_id, first=first, count=count, principal=principal)
    return UploadPartsOut(parts=[UploadPartOut(number=p.number, url=p.url) for p in parts])


_BLOB_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


class _BodyPipe:
    """The request body as a file that the verifier reads in a worker thread while the event loop
    receives it; at most `depth` batches wait between the two. The reader closes it when it
    stops (verdict reached, or failed), so the sender stops handing it bytes."""

    def __init__(self, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._buf = memoryview(b"")
        self._eof = False

    def put(self, item: bytes | BaseException | None) -> bool:
        """Hand over a batch (None: the end; an exception: raised by `read`); False once closed."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read(self, n: int = -1) -> bytes:
        while not self._buf and not self._eof:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if item is None:
                self._eof = True
            else:
                self._buf = memoryview(item)
        n = len(self._buf) if n is None or n < 0 else n
        out = bytes(self._buf[:n])
        self._buf = self._buf[n:]
        return out

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(queue.Full):  # wakes a reader waiting for bytes that will not come
            self._queue.put_nowait(_Interrupted())


class _Copying:
    """Reads `src`, writing what it reads to `fh` on the way (the staged file)."""

    def __init__(self, src: _BodyPipe, fh: IO[bytes]):
        self.src, self.fh = src, fh

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.fh.write(data)
        return data


@router.put("/v1/uploads/{upload_id}", response_model=UploadReceived, openapi_extra=_BLOB_BODY)
async def send_upload_bytes(
    upload_id: UploadId,
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    content_length: Annotated[int | None, Header(include_in_schema=False)] = None,
):
    """Stream the blob's bytes (local store; a streamed push sends them chunked, its size
    unknown up front). Written to a fresh staged file while verified (sha256 of the stored
    bytes, one zstd frame of the declared raw size, a format-v1 header of the repository's base,
    which the first bytes must already begin), never held in memory and never read again: a
    refusal comes as soon as the bytes show it, and `complete` only compares what they were
    with what the client names."""
    upload = await run_in_threadpool(state.pushes.get, upload_id=upload_id, principal=principal)
    if upload.method != "stream":
        raise ConflictError(f"upload {upload_id} takes no bytes here (method {upload.method})")
    if content_length is not None:
        refusal = None
        if content_length > state.settings.max_upload_bytes:
            refusal = UploadTooLargeError(
                f"{content_length} bytes exceed this registry's limit of {state.settings.max_upload_bytes}"
            )
        elif upload.size is not None and content_length != upload.size:
            refusal = SizeMismatchError(
                f"request has {content_length} bytes but the upload declared {upload.size}"
            )
        if refusal is not None:  # refused bytes drop the upload, as when verification refuses them
            await run_in_threadpool(state.pushes.refuse, upload=upload, error=refusal)
    received = 0
    pipe = _BodyPipe()

    def verify(fh: IO[bytes]):
        try:
            return state.pushes.receive(upload=upload, src=_Copying(pipe, fh))
        finally:
            pipe.close()

    with state.store.staging_writer(upload_id) as (fh, token):
        verifying = asyncio.ensure_future(run_in_threadpool(verify, fh))
        try:
            pending = bytearray()
            accepted = True
            async for chunk in request.stream():
                received += len(chunk)
                if not accepted:
                    continue  # refused: the rest of the body is read (so the answer arrives) and dropped
                pending += chunk
                if len(pending) >= _WRITE_BATCH:
                    accepted = await run_in_threadpool(pipe.put, bytes(pending))
                    pending.clear()
            if accepted:
                await run_in_threadpool(pipe.put, bytes(pending))
                await run_in_threadpool(pipe.put, None)
        except ClientDisconnect:
            await run_in_threadpool(pipe.put, _Interrupted())
            await asyncio.gather(verifying, return_exceptions=True)
            raise InvalidRequestError(f"upload {upload_id} was interrupted after {received} bytes") from None
        except BaseException:
            pipe.close()
            await asyncio.gather(verifying, return_exceptions=True)
            raise
        verified = await verifying
    await run_in_threadpool(state.pushes.record_received, upload=upload, received=verified, token=token)
    return UploadReceived(
        id=upload_id,
        received=verified.size,
        digest=verified.digest,
        raw_size=verified.raw_size,
        raw_digest=verified.raw_digest,
    )


class _Interrupted(Exception):
    """The request body ended before its end (the client went away)."""


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
def complete_upload(
    upload_id: UploadId,
    state: StateDep,
    principal: PrincipalDep,
    response: Response,
    body: Annotated[UploadComplete | None, Body()] = None,
):
    """Verify the stored bytes (size, sha256, one zstd frame, format-v1 header of the repository's
    base) against the digests and sizes the body names (and any declared up front), and publish
    the version: it gets the next number and `latest` moves to it (201). Bytes that came through
    the registry were verified as they arrived; only what they were is compared. Completing an
    upload that was published already answers 200 with that same version, so a client that lost
    the first answer may simply call `complete` again."""
    named = None if body is None else Declared(body.digest, body.size, body.raw_digest, body.raw_size)
    parts = None if body is None or body.parts is None else [(p.number, p.etag) for p in body.parts]
    version, published = state.pushes.complete(
        upload_id=upload_id, principal=principal, named=named, parts=parts
    )
    if not published:
        response.status_code = status.HTTP_200_OK
    with state.db.read() as session:
        return versions_out(session, [session.get(Version, version.id)])[0]


@router.delete("/v1/uploads/{upload_id}", status_code=status.HTTP_204_NO_CONTENT)
def abort_upload(upload_id: UploadId, state: StateDep, principal: PrincipalDep) -> None:
    state.pushes.abort(upload_id=upload_id, principal=principal)
