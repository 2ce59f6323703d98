"""Pull: a version's delta into the cache (downloaded, verified and decompressed in one pass,
resumed with Range after a cut), or served from the cache when it holds it already.

    result = pull(http, cache, version, output=None, progress=Silent())
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from codec.files import CHUNK, AtomicWriter, output_file
from registry.client import settings
from registry.client.cache import DeltaCache
from registry.client.errors import CorruptDownloadError, OfflineError, TransferInterruptedError
from registry.client.http import (
    BLOB_STORE_FAILURES,
    REDIRECTS,
    RegistryHttp,
    api_error,
    backoff,
    reason,
    retrying,
)
from registry.client.transfer import receive_blob
from registry.client.types import Progress, PullResult, VersionInfo
from registry.common.errors import BlobStoreError


def pull(
    http: RegistryHttp | None,
    cache: DeltaCache,
    version: VersionInfo,
    *,
    registry: str,
    output: str | os.PathLike[str] | None,
    progress: Progress,
    started: float,
) -> PullResult:
    """`version` available locally: from the cache when it holds the delta, else downloaded
    through `http` (None: offline, only the cache may serve it). With `output`, a copy is
    written there too (a directory, or a path ending in '/', gets `<namespace>-<name>-v<N>.bdelta`)."""
    expected = version.blob
    with cache.blob_lock(expected.raw_digest):
        corrupt_before = len(cache.corrupt_found)
        blob = cache.cached_blob(expected.raw_digest, expected.raw_size)
        repaired = len(cache.corrupt_found) > corrupt_before
        hit = blob is not None
        downloaded = 0
        if not hit:
            if http is None:
                raise OfflineError(
                    f"{version.repository}@{version.number} is not in the cache, and the client is "
                    "offline (DELTACTL_OFFLINE)"
                )
            try:
                downloaded = download(http, cache, version, progress)
            finally:
                progress.stop()
            blob = cache.blob_path(expected.raw_digest)
    path = cache.record_version(registry, version.as_dict())
    if output is not None:
        path = copy_out(blob, output, version)
    return PullResult(
        version=version,
        path=path,
        blob=blob,
        cache_hit=hit,
        downloaded_bytes=downloaded,
        seconds=time.perf_counter() - started,
        repaired=repaired,
    )


def download(http: RegistryHttp, cache: DeltaCache, version: VersionInfo, progress: Progress) -> int:
    """Download the version's blob into the cache; returns the bytes that came over the network.
    A cut transfer is resumed from the kept partial file (up to TRANSFER_ATTEMPTS tries); bytes
    that turn out corrupt after a resume are fetched once more from zero (the kept part may be
    what is wrong)."""
    expected = version.blob
    partial = cache.partial_path(expected.raw_digest, expected.digest)
    dest = cache.blob_path(expected.raw_digest)
    moved = 0
    resumed_from = [0]
    fresh_retry = [False]

    def advance(n: int) -> None:
        nonlocal moved
        moved += n
        progress.advance(n)

    def attempt() -> None:
        offset = partial.stat().st_size if partial.exists() else 0
        if offset > expected.size:
            partial.unlink()
            offset = 0
        resumed_from[0] = offset
        with open_download(http, version.download_url, offset, expected.size) as (chunks, start):
            progress.start("downloading", expected.size, completed=start)
            receive_blob(chunks, partial=partial, offset=start, dest=dest, expected=expected, advance=advance)

    def again(exc: BaseException) -> bool:
        if isinstance(exc, TransferInterruptedError):
            return True
        if isinstance(exc, CorruptDownloadError) and resumed_from[0] and not fresh_retry[0]:
            fresh_retry[0] = True
            return True
        return False

    retrying(
        attempt,
        attempts=settings.TRANSFER_ATTEMPTS,
        retry_on=again,
        wait=lambda state: (
            0.0 if isinstance(state.outcome.exception(), CorruptDownloadError) else backoff(state)
        ),
    )
    return moved


@contextlib.contextmanager
def open_download(
    http: RegistryHttp, url: str, offset: int, size: int
) -> Iterator[tuple[Iterator[bytes], int]]:
    """The blob's bytes from `offset` on: through the registry or, after its redirect, from the
    blob store (without the token). Yields (chunks, the offset they actually start at)."""
    if offset >= size:
        yield iter(()), offset
        return
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with http.network("the download"):
        response = http.waiting_out_503(
            "GET", lambda: http.api.send(http.api.build_request("GET", url, headers=headers), stream=True)
        )
    if response.status_code in REDIRECTS:
        location = response.headers.get("location", "")
        response.close()
        with open_blob_store_download(http, location, headers) as (chunks, status):
            yield chunks, offset if status == 206 else 0
        return
    try:
        if response.is_error:
            response.read()
            raise api_error(response)
        start = offset if response.status_code == 206 else 0

        def chunks() -> Iterator[bytes]:
            try:
                yield from response.iter_bytes(CHUNK)
            except httpx.TransportError as exc:
                raise TransferInterruptedError(f"connection lost: {reason(exc)}") from None

        yield chunks(), start
    finally:
        response.close()


@contextlib.contextmanager
def open_blob_store_download(
    http: RegistryHttp, url: str, headers: dict[str, str]
) -> Iterator[tuple[Iterator[bytes], int]]:
    """The body of the blob store's answer to the presigned `GET url` in CHUNK reads (through
    urllib3: `RegistryHttp.blob_gets`), and its status. The connection goes back to the pool
    when the body was read to its end, and is closed when it was abandoned part-way."""
    with http.blob_store_network(url, "the download"):
        response = http.waiting_out_503(
            "GET", lambda: http.blob_gets.get(url, headers), status=lambda r: r.status
        )
    complete = False
    try:
        if response.status >= 400:
            with contextlib.suppress(*BLOB_STORE_FAILURES):
                response.read()
            raise BlobStoreError(f"the blob store answered HTTP {response.status} to the download")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):  # what is hashed and kept must be the stored bytes
            raise BlobStoreError(
                f"the blob store sent the download with Content-Encoding {encoding!r}; the registry "
                "stores blobs without one"
            )

        def chunks() -> Iterator[bytes]:
            nonlocal complete
            try:
                while buf := response.read(CHUNK):
                    yield buf
            except BLOB_STORE_FAILURES as exc:
                raise TransferInterruptedError(f"connection lost: {reason(exc)}") from None
            complete = True

        yield chunks(), response.status
    finally:
        if not complete:
            response.close()
        response.release_conn()


def copy_out(blob: Path, output: str | os.PathLike[str], version: VersionInfo) -> Path:
    """A copy of the cached `blob` at `output` (atomically; never over a device or the blob)."""
    target = output_file(output, f"{version.repository.replace('/', '-')}-v{version.number}.bdelta")
    with open(blob, "rb") as src, AtomicWriter(target, inputs=[blob]) as dst:
        shutil.copyfileobj(src, dst, CHUNK)
    return target
