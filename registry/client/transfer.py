"""Moving blob bytes: the storage form made, hashed and cut into parts as the file is read
(`StorageForm`), parts uploaded in parallel straight to their presigned URLs as they are made,
and downloads that hash, keep the compressed bytes for a Range resume and decompress into the
cache in the same pass.

    form = StorageForm(path, part_size=8 << 20)
    upload_parts(http, form.parts(), url_for=..., skip=..., concurrency=10)
    form.info                                                # digests and sizes, once read
    receive_blob(chunks, partial=..., offset=n, dest=..., expected=info, progress=bar)
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import zstandard

from codec.files import CHUNK, AtomicWriter
from codec.storage import DEFAULT_LEVEL, BlobCorruptError, BlobInfo, BlobTooLargeError, decompress_stream
from registry.client import settings
from registry.client.errors import CorruptDownloadError, NetworkError, TransferInterruptedError
from registry.client.http import TRANSIENT_STATUSES, netloc, retrying, s3_error
from registry.common.readahead import ReadAhead

#: Called with a number of bytes just moved (negative when a failed attempt is taken back).
Advance = Callable[[int], None]


def _no_progress(n: int) -> None:
    pass


class StorageForm:
    """The registry's storage form of the file at `path` (one zstd frame at codec.storage's level,
    its content size in the header: the same bytes `codec.storage.compress_blob` writes), made
    as the file is read and cut into parts of `part_size` bytes (the last one shorter; an empty
    file still gives one part). zstd at fixed parameters is deterministic, so reading the file
    again gives the same parts: a resumed push recognises those the store holds. `info` (the
    digests and sizes) is known once every part was taken."""

    def __init__(self, path: Path, *, part_size: int):
        self.path, self.part_size = Path(path), part_size
        self.raw_size = os.stat(path).st_size
        self._info: BlobInfo | None = None

    @property
    def info(self) -> BlobInfo:
        if self._info is None:
            raise RuntimeError("the storage form's digests are known once every part was read")
        return self._info

    def parts(self) -> Iterator[bytes]:
        cobj = zstandard.ZstdCompressor(level=DEFAULT_LEVEL, write_content_size=True).compressobj(
            size=self.raw_size
        )
        raw_sha, sha = hashlib.sha256(), hashlib.sha256()
        raw_n = size = 0
        pending = bytearray()
        with open(self.path, "rb") as fh:
            while True:
                buf = fh.read(CHUNK)
                raw_n += len(buf)
                if raw_n > self.raw_size or (not buf and raw_n != self.raw_size):
                    raise OSError(
                        f"{self.path} changed size while being pushed ({self.raw_size} -> {raw_n}+ bytes)"
                    )
                out = cobj.compress(buf) if buf else cobj.flush()
                raw_sha.update(buf)
                sha.update(out)
                size += len(out)
                pending += out
                while len(pending) >= self.part_size:
                    yield bytes(pending[: self.part_size])
                    del pending[: self.part_size]
                if not buf:
                    break
        if pending:  # a zstd frame is never empty: the file always gives at least one part
            yield bytes(pending)
        self._info = BlobInfo("sha256:" + sha.hexdigest(), size, "sha256:" + raw_sha.hexdigest(), raw_n)


def _bytes_chunks(data: bytes, advance: Advance, sent: list[int]) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), CHUNK):
        buf = view[start : start + CHUNK]
        sent[0] += len(buf)
        advance(len(buf))
        yield buf


def put_content(
    http: httpx.Client,
    url: str,
    content: Callable[[Advance, list[int]], Iterable[bytes]],
    *,
    size: int | None,
    headers: dict | None = None,
    advance: Advance = _no_progress,
    attempts: int | None = None,
) -> httpx.Response:
    """PUT the chunks `content(advance, sent)` makes afresh for each attempt to `url`, with a
    fixed Content-Length when `size` is known (else chunked); transient failures (connection
    errors, 5xx, 429) are retried with backoff (the client's one retry policy). After the last
    attempt a connection failure is raised as the httpx error it is, for the caller to say
    which server (the registry or the blob store) failed."""
    sent = [0]

    def put() -> httpx.Response:
        sent[0] = 0
        length = {} if size is None else {"Content-Length": str(size)}
        return http.put(url, content=content(advance, sent), headers={**(headers or {}), **length})

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


def put_bytes(
    http: httpx.Client, url: str, data: bytes, *, advance: Advance = _no_progress, attempts: int | None = None
) -> httpx.Response:
    """`put_content` of bytes in memory (one part)."""
    return put_content(
        http,
        url,
        lambda adv, sent: _bytes_chunks(data, adv, sent),
        size=len(data),
        advance=advance,
        attempts=attempts,
    )


def part_etag(data: bytes) -> str:
    """The ETag S3 gives a part it stored: the quoted MD5 of its bytes."""
    return f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'


def upload_parts(
    http: httpx.Client,
    parts: Iterable[bytes],
    *,
    url_for: Callable[[int], str],
    held: Callable[[int, bytes], str | None] = lambda number, data: None,
    concurrency: int,
    advance: Advance = _no_progress,
    on_part: Callable[[int], None] = lambda number: None,
) -> tuple[int, int, dict[int, str]]:
    """PUT each part `parts` yields (numbered from 1) to `url_for(number)`, `concurrency` at a time,
    while the next ones are made: at most `concurrency` + 1 parts are in memory, whatever the
    file's size. A part for which `held(number, data)` gives an ETag (a resumed upload: the store
    has those bytes) is skipped. The first part that fails for good stops the rest and is raised
    (a refusal as NetworkError, a connection failure as its httpx error). Returns (bytes sent,
    parts skipped, the ETag of every part by number: as the store answered its PUT, or held)."""
    lock = threading.Lock()
    stop = threading.Event()  # set by the first failure: no part starts after it
    room = threading.BoundedSemaphore(concurrency + 1)
    sent = [0, 0]
    etags: dict[int, str] = {}

    def locked(n: int) -> None:
        with lock:
            advance(n)

    def send(number: int, url: str, data: bytes) -> None:
        try:
            if stop.is_set():
                return
            r = put_bytes(http, url, data, advance=locked)
            if r.status_code != 200:
                raise NetworkError(
                    f"the blob store at {netloc(url)} refused part {number}: "
                    f"HTTP {r.status_code} {s3_error(r)}"
                )
            with lock:
                sent[0] += len(data)
                etags[number] = r.headers.get("etag", "")
            on_part(number)
        except BaseException:
            stop.set()
            raise
        finally:
            room.release()

    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="part")
    futures: list[Future] = []
    try:
        for number, data in enumerate(parts, start=1):
            etag = held(number, data)
            if etag:
                sent[1] += 1
                etags[number] = etag
                locked(len(data))
                continue
            url = url_for(number)
            while not room.acquire(timeout=0.1):  # bounded memory: wait for a part in flight to finish
                if stop.is_set():
                    break
            if stop.is_set():
                break
            futures.append(pool.submit(send, number, url, data))
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        # On a failure or Ctrl-C no queued part starts; those in flight finish (or fail) first.
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
    for future in futures:
        if not future.cancelled() and future.exception() is not None:
            raise future.exception()
    return sent[0], sent[1], etags


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
