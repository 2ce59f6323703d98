"""Moving blob bytes: parallel part uploads straight to their (presigned) URLs, streamed single
uploads, and downloads that hash, keep the compressed bytes for a Range resume and decompress
into the cache in the same pass.

    upload_parts(http, staged, parts, progress=bar)          # only the parts given
    receive_blob(chunks, partial=..., offset=n, dest=..., expected=info, progress=bar)
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import httpx

from codec.files import CHUNK, AtomicWriter
from codec.storage import BlobCorruptError, BlobInfo, BlobTooLargeError, decompress_stream
from registry.client import settings
from registry.client.errors import CorruptDownloadError, NetworkError, TransferInterruptedError
from registry.client.http import TRANSIENT_STATUSES, netloc, retrying, s3_error
from registry.common.readahead import ReadAhead

#: Called with a number of bytes just moved (negative when a failed attempt is taken back).
Advance = Callable[[int], None]


def _no_progress(n: int) -> None:
    pass


def _file_chunks(path: Path, offset: int, size: int, advance: Advance, sent: list[int]) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = size
        while left:
            buf = fh.read(min(CHUNK, left))
            if not buf:
                raise OSError(f"{path} is shorter than expected (it changed during the push)")
            left -= len(buf)
            sent[0] += len(buf)
            advance(len(buf))
            yield buf


def put_range(
    http: httpx.Client,
    url: str,
    path: Path,
    offset: int,
    size: int,
    *,
    headers: dict | None = None,
    advance: Advance = _no_progress,
    attempts: int | None = None,
) -> httpx.Response:
    """PUT bytes [offset, offset+size) of `path` to `url`, streamed with a fixed Content-Length;
    transient failures (connection errors, 5xx, 429) are retried with backoff (the client's one
    retry policy). After the last attempt a connection failure is raised as the httpx error it
    is, for the caller to say which server (the registry or the blob store) failed."""
    sent = [0]

    def put() -> httpx.Response:
        sent[0] = 0
        return http.put(
            url,
            content=_file_chunks(path, offset, size, advance, sent),
            headers={**(headers or {}), "Content-Length": str(size)},
        )

    try:
        return retrying(
            put,
            attempts=attempts or settings.TRANSFER_ATTEMPTS,
            retry_on=lambda exc: isinstance(exc, httpx.TransportError),
            retry_result=lambda response, state: response.status_code in TRANSIENT_STATUSES,
            before_retry=lambda state: advance(-sent[0]),  # the bytes of a failed attempt are sent again
        )
    except httpx.TransportError:
        advance(-sent[0])
        raise


def upload_parts(
    http: httpx.Client,
    path: Path,
    parts: Iterable[dict],
    *,
    concurrency: int,
    advance: Advance = _no_progress,
    on_part: Callable[[dict], None] = lambda part: None,
) -> None:
    """PUT each part (`{number, url, offset, size}`) of the file at `path` to its presigned blob-store
    URL, `concurrency` at a time. The first part that fails for good stops the rest and is raised
    (a refusal as NetworkError, a connection failure as its httpx error)."""
    lock = threading.Lock()
    stop = threading.Event()  # set by the first failure: a worker never starts another part after it

    def locked(n: int) -> None:
        with lock:
            advance(n)

    def send(part: dict) -> None:
        if stop.is_set():
            return
        try:
            _send(part)
        except BaseException:
            stop.set()
            raise

    def _send(part: dict) -> None:
        r = put_range(http, part["url"], path, part["offset"], part["size"], advance=locked)
        if r.status_code != 200:
            raise NetworkError(
                f"the blob store at {netloc(part['url'])} refused part "
                f"{part['number']}: HTTP {r.status_code} {s3_error(r)}"
            )
        on_part(part)

    parts = list(parts)
    pool = ThreadPoolExecutor(
        max_workers=max(1, min(concurrency, len(parts) or 1)), thread_name_prefix="part"
    )
    try:
        futures = [pool.submit(send, part) for part in parts]
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        # On a failure or Ctrl-C no queued part starts; those in flight finish (or fail) first.
        pool.shutdown(wait=True, cancel_futures=True)
    for future in futures:
        if not future.cancelled() and future.exception() is not None:
            raise future.exception()


class _Received(ReadAhead):
    """The compressed bytes of a download as a readable stream, filled by a background thread
    that first re-reads what an earlier attempt left in the partial file, then appends what the
    network delivers to it. Hashing, disk writes and the network overlap the decompression,
    which reads from `read` in the calling thread."""

    def __init__(self, chunks: Iterable[bytes], partial: Path, offset: int, advance: Advance):
        self.sha = hashlib.sha256()
        self.n = 0
        super().__init__(self._chunks(chunks, partial, offset, advance), chunk_size=CHUNK)

    def _take(self, buf: bytes) -> bytes:
        self.sha.update(buf)
        self.n += len(buf)
        return buf

    def _chunks(
        self, chunks: Iterable[bytes], partial: Path, offset: int, advance: Advance
    ) -> Iterator[bytes]:
        with open(partial, "r+b" if offset else "wb") as fh:
            while fh.tell() < offset and (buf := fh.read(min(CHUNK, offset - fh.tell()))):
                yield self._take(buf)
            fh.seek(offset)
            fh.truncate()
            for buf in chunks:
                fh.write(buf)
                advance(len(buf))
                yield self._take(buf)
            fh.flush()


def receive_blob(
    chunks: Iterable[bytes],
    *,
    partial: Path,
    offset: int,
    dest: Path,
    expected: BlobInfo,
    advance: Advance = _no_progress,
) -> None:
    """Take a blob's compressed bytes from `chunks` (those after `offset`; the first `offset` are
    in `partial` already), keep them in `partial` for a resume, check their size and sha256,
    and decompress them, capped at the recorded raw size and checked against the raw sha256,
    into `dest` (atomically: codec.files.AtomicWriter). `partial` is removed on success and on
    corruption, kept when the transfer was cut."""
    out = AtomicWriter(dest)
    stream = _Received(chunks, partial, offset, advance)
    failure: BaseException | None = None
    try:
        decompress_stream(
            stream, out.file, max_output_size=expected.raw_size, expected_raw_digest=expected.raw_digest
        )
    except BaseException as exc:
        failure = exc
    stream.close()
    if stream.error is not None or (
        failure is not None and not isinstance(failure, (BlobCorruptError, BlobTooLargeError))
    ):
        out.abort()
        cause = stream.error or failure
        if isinstance(cause, (httpx.TransportError, NetworkError)):
            raise TransferInterruptedError(
                f"download stopped after {stream.n} of {expected.size} bytes ({cause}); pull again to resume"
            ) from None
        raise cause  # type: ignore[misc]
    digest = "sha256:" + stream.sha.hexdigest()
    if failure is not None or stream.n != expected.size or digest != expected.digest:
        out.abort()
        partial.unlink(missing_ok=True)  # wrong bytes are no base for a resume
        if failure is not None and not stream.complete:
            raise CorruptDownloadError(f"the downloaded bytes are not the recorded delta: {failure}")
        raise CorruptDownloadError(
            f"downloaded {stream.n} bytes with digest {digest}, "
            f"but the registry recorded {expected.size} bytes "
            f"with digest {expected.digest}"
        )
    out.commit()
    partial.unlink(missing_ok=True)
