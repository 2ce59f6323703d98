"""Verification of a multipart push while its parts arrive: each part is an object of its own,
which a background pass reads once, in part order, as soon as it exists — hashing and
decompressing all of them as one stream (`verify.scan_stream`) and handing each to the store to
assemble into the blob — so that `complete` only waits for the pass to take the last part.

    checks = PartChecks(store, settings, still_pending=...)
    checks.start(ref, raw_size=..., part_size=..., limit=...)   # as the upload is created
    outcome = checks.take(ref.upload_id).finish(expected_parts=n)  # at `complete`; None: run one now

A pass lives in the memory of the process that started it (hash and decompressor state cannot
be stored); `complete` on another replica, after a restart, or when the pass stopped, runs the
same pass itself over the parts the store holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from registry.common.errors import BlobStoreError, ConflictError, DigestMismatchError, SizeMismatchError
from registry.server.blobstores import BlobStore, FetchedPart, UploadRef
from registry.server.verify import Scan, scan_stream

#: Parts fetched at once, ahead of the one being verified (one GET stream is far below what an
#: S3 endpoint serves), and parts held read but not yet assembled, per pass.
PREFETCH = 4
ASSEMBLY_DEPTH = 2
#: After `complete`, how long a part may stay shorter than it must be (its PUT still being
#: written) before it is judged as it is.
SHORT_GRACE = 2.0
#: A background pass that sees no new part for this long stops (a client gone without aborting);
#: `complete` then runs a pass of its own, and a resumed push starts a new one.
IDLE_SECONDS = 600.0


@dataclass(frozen=True)
class PartsOutcome:
    """What a pass found: the scan of all parts' bytes, the (number, ETag) of each part object it
    read, and the (number, ETag) each has in the blob's multipart upload, or the error that
    stopped the assembly."""

    scan: Scan
    parts: list[tuple[int, str]]
    assembled: list[tuple[int, str]]
    assembly_error: BaseException | None


class _Stopped(Exception):
    """The pass was stopped: its upload is gone, it waited too long for a part, or the server
    is shutting down."""


class PartPass:
    """One pass over an upload's parts, readable as one stream (`read`) by the scan. A pass with
    `expected_parts` runs over what the store holds; one without waits for each next part until
    `finish` names how many there are (the last part may also show itself by being short)."""

    def __init__(
        self,
        store: BlobStore,
        ref: UploadRef,
        *,
        raw_size: int,
        part_size: int,
        limit: int,
        max_header_bytes: int,
        expected_raw_digest: str | None = None,
        expected_parts: int | None = None,
        expected_size: int = 0,
        idle_timeout: float = IDLE_SECONDS,
        still_pending: Callable[[], bool] = lambda: True,
        poll: tuple[float, float] = (0.02, 0.5),
    ):
        self.store, self.ref = store, ref
        self.raw_size, self.part_size, self.limit = raw_size, part_size, limit
        self.max_header_bytes, self.expected_raw_digest = max_header_bytes, expected_raw_digest
        self.idle_timeout, self.still_pending, self.poll = idle_timeout, still_pending, poll
        self._expected, self._size = expected_parts, expected_size
        self._read: list[tuple[int, str]] = []
        self._buf = memoryview(b"")
        self._eof = False
        self._stop = threading.Event()
        self._finishing = threading.Event()  # set by `finish` and `stop`: waits end at once
        self._closed = threading.Event()  # the scan is over: fetches still waiting end
        self._done = threading.Event()
        self._slots = threading.Semaphore(ASSEMBLY_DEPTH)
        self._assembly = ThreadPoolExecutor(
            max_workers=ASSEMBLY_DEPTH, thread_name_prefix="deltastore-assemble"
        )
        self._assembled: dict[int, Future] = {}
        self._prefetch = ThreadPoolExecutor(max_workers=PREFETCH, thread_name_prefix="deltastore-fetch")
        self._fetched: dict[int, Future] = {}
        self._thread: threading.Thread | None = None
        self.outcome: PartsOutcome | None = None
        self.error: BaseException | None = None

    # --- the stream the scan reads -----------------------------------------------------------
    def read(self, n: int = -1) -> bytes:
        while not self._buf:
            if self._eof:
                return b""
            self._next_part()
        want = len(self._buf) if n is None or n < 0 else n
        out = bytes(self._buf[:want])
        self._buf = self._buf[want:]
        return out

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def _next_part(self) -> None:
        number = len(self._read) + 1
        for ahead in range(number, number + PREFETCH):
            if ahead not in self._fetched:
                self._fetched[ahead] = self._prefetch.submit(self._wait_for, ahead)
        part = self._fetched.pop(number).result()
        if part is None:
            self._eof = True
            return
        if len(part.data) > self.part_size:
            raise SizeMismatchError(
                f"part {number} of upload {self.ref.upload_id} has more than the upload's part size "
                f"of {self.part_size} bytes (every part but the last has exactly that size)"
            )
        self._read.append((number, part.etag))
        self._buf = memoryview(part.data)
        # only the last part is short (one that is not: its size shows in the verdict)
        self._eof = number == self._expected or len(part.data) < self.part_size
        while not self._slots.acquire(timeout=0.1):
            if self._stop.is_set():
                raise _Stopped()
        self._assembled[number] = self._assembly.submit(self._assemble, part)

    def _assemble(self, part: FetchedPart) -> str:
        try:
            return self.store.assemble_part(self.ref, part)
        finally:
            self._slots.release()

    def _wanted(self, number: int) -> int:
        """The bytes part `number` must have: the part size, but for the last part, whose size
        is known only once `finish` names the upload's."""
        if self._expected is None or number < self._expected:
            return self.part_size
        return self._size - (self._expected - 1) * self.part_size

    def _wait_for(self, number: int) -> FetchedPart | None:
        """Part `number` once the store holds all of its bytes; None past the last part.

        A part is read only once it has the size it must have (its HEAD says so, then its GET
        brings that much): a store may show an object while its PUT is still writing it
        (s3rver does), and a short part is the last one only when `finish` says so. After
        `finish`, a part still short after SHORT_GRACE seconds is taken as it is, and the
        verdict names the sizes."""
        delay, since, checked = self.poll[0], time.monotonic(), time.monotonic()
        short_since: float | None = None
        while True:
            if self._stop.is_set() or self._closed.is_set():
                raise _Stopped()
            if self._expected is not None and number > self._expected:
                return None
            want = self._wanted(number)
            part = None
            try:
                stored = self.store.stored_part_size(self.ref, number)
                whole = stored is not None and (stored >= want or self._grace_over(short_since))
                if whole:
                    part = self.store.fetch_part(self.ref, number, max_bytes=self.part_size + 1)
            except BlobStoreError:
                if self._expected is not None:
                    raise  # `complete` is waiting: it answers 502, and a retry runs a new pass
                stored = None  # the store unreachable for now: wait for it as for the part
            if part is not None and (len(part.data) >= want or self._grace_over(short_since)):
                return part
            if stored is None and self._expected is not None:
                raise ConflictError(
                    f"upload {self.ref.upload_id} is missing part {number} of {self._expected}; "
                    "upload every part before completing"
                )
            if stored is not None and self._expected is not None and short_since is None:
                short_since, delay = time.monotonic(), self.poll[0]
            now = time.monotonic()
            if now - since > self.idle_timeout:
                raise _Stopped()
            if now - checked > 10:
                checked = now
                if not self.still_pending():
                    raise _Stopped()
            if self._finishing.is_set():
                time.sleep(delay)
            else:
                self._finishing.wait(delay)
            delay = min(2 * delay, self.poll[1])

    @staticmethod
    def _grace_over(short_since: float | None) -> bool:
        return short_since is not None and time.monotonic() - short_since > SHORT_GRACE

    # --- running it ----------------------------------------------------------------------------
    def run(self) -> PartsOutcome:
        """The whole pass in the calling thread."""
        try:
            scan = scan_stream(
                self,
                self.raw_size,
                limit=self.limit,
                max_header_bytes=self.max_header_bytes,
                expected_raw_digest=self.expected_raw_digest,
            )
            assembled, error = [], None
            try:
                assembled = [(n, future.result()) for n, future in sorted(self._assembled.items())]
            except Exception as exc:  # reported only if the bytes pass: a verdict on them comes first
                error = exc
            return PartsOutcome(scan, list(self._read), assembled, error)
        finally:
            self._stop_fetching()
            self._assembly.shutdown(wait=False, cancel_futures=True)

    def start(self) -> None:
        """Run the pass in a background thread, waiting for each part as it comes."""
        self._thread = threading.Thread(target=self._background, name="deltastore-parts", daemon=True)
        self._thread.start()

    def _background(self) -> None:
        try:
            self.outcome = self.run()
        except BaseException as exc:  # handed to `finish`
            self.error = exc
        finally:
            self._done.set()

    def finish(self, expected_parts: int, size: int) -> PartsOutcome | None:
        """The pass's outcome once it has taken `expected_parts` parts; None if it did not get
        there (stopped, or failed on something other than the bytes: the caller runs a pass of
        its own). `size`: the stored bytes `complete` names, which fix the last part's size."""
        self._size, self._expected = size, expected_parts
        self._finishing.set()
        self._done.wait()
        if isinstance(self.error, DigestMismatchError):
            raise self.error  # a verdict on the bytes (a part larger than the part size)
        return self.outcome if self.error is None else None

    def stop(self) -> None:
        self._stop.set()
        self._finishing.set()

    def _stop_fetching(self) -> None:
        """End the fetches still waiting for parts past the end (or for a pass that failed)."""
        self._closed.set()
        self._finishing.set()
        self._prefetch.shutdown(wait=False, cancel_futures=True)

    @property
    def failed(self) -> bool:
        """Stopped, or ended without an outcome: a new pass must start over."""
        return self._stop.is_set() or self.error is not None


class PartChecks:
    """The passes this process runs for uploads in flight, at most `capacity` at once (each holds
    a few parts and a zstd decompressor in memory); an upload beyond them is verified whole at
    `complete`, as on another replica."""

    def __init__(
        self,
        store: BlobStore,
        *,
        capacity: int,
        max_header_bytes: int,
        still_pending: Callable[[str], bool],
        idle_timeout: float = IDLE_SECONDS,
    ):
        self.store, self.capacity = store, capacity
        self.max_header_bytes, self.idle_timeout = max_header_bytes, idle_timeout
        self.still_pending = still_pending
        self._passes: dict[str, PartPass] = {}
        self._lock = threading.Lock()

    def new_pass(
        self,
        ref: UploadRef,
        *,
        raw_size: int,
        part_size: int,
        limit: int,
        expected_raw_digest: str | None,
        expected_parts: int | None = None,
        expected_size: int = 0,
    ) -> PartPass:
        return PartPass(
            self.store,
            ref,
            raw_size=raw_size,
            part_size=part_size,
            limit=limit,
            max_header_bytes=self.max_header_bytes,
            expected_raw_digest=expected_raw_digest,
            expected_parts=expected_parts,
            expected_size=expected_size,
            idle_timeout=self.idle_timeout,
            still_pending=lambda: self.still_pending(ref.upload_id),
        )

    def start(self, ref: UploadRef, **kwargs) -> None:
        """Start a background pass for the upload, unless one runs or none is free."""
        with self._lock:
            for upload_id in [u for u, p in self._passes.items() if p.failed]:
                del self._passes[upload_id]
            if ref.upload_id in self._passes or len(self._passes) >= self.capacity:
                return
            self._passes[ref.upload_id] = part_pass = self.new_pass(ref, **kwargs)
        part_pass.start()

    def take(self, upload_id: str) -> PartPass | None:
        """The upload's background pass, no longer listed (its outcome is the caller's)."""
        with self._lock:
            return self._passes.pop(upload_id, None)

    def stop(self, upload_id: str) -> None:
        part_pass = self.take(upload_id)
        if part_pass is not None:
            part_pass.stop()

    def close(self) -> None:
        with self._lock:
            passes, self._passes = list(self._passes.values()), {}
        for part_pass in passes:
            part_pass.stop()
