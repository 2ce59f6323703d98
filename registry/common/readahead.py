"""A read-ahead stream: a background thread takes chunks from a producer (an iterator that reads
the network or a file, hashes, writes a copy...) while the calling thread reads them as a file
(`read(n)`), so that I/O, hashing and the reader's work (zstd decompression) overlap; hashlib
and zstd release the GIL. Used by the client's downloads (`registry.transfer`) and by the
server's upload verification (`registry.verify`); it imports only the standard library.

    stream = ReadAhead(chunks())               # chunks() runs in the background thread
    decompress_stream(stream, out, ...)        # reads as from a file
    stream.close()
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

from codec.files import CHUNK


class ReadAhead:
    """A non-seekable readable stream over `chunks`, which a daemon thread iterates ahead of the
    reader, at most `depth` chunks ahead. An exception the producer raises is kept in `error`
    and raised by `read` once the chunks before it are read. `close` stops the producer at its
    next chunk (its generator is closed, so its `with` blocks run)."""

    def __init__(self, chunks: Iterable[bytes], *, depth: int = 8, chunk_size: int = CHUNK):
        self.chunk_size = chunk_size
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._buf = memoryview(b"")
        self._eof = False
        self._thread = threading.Thread(
            target=self._fill, args=(iter(chunks),), name="deltastore-readahead", daemon=True
        )
        self._thread.start()

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, chunks: Iterator[bytes]) -> None:
        try:
            for buf in chunks:
                if buf and not self._put(buf):
                    return
            self._put(b"")
        except BaseException as exc:  # handed over to the reading thread
            self.error = exc
            self._put(exc)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def read(self, n: int = -1) -> bytes:
        want = self.chunk_size if n is None or n < 0 else n
        while not self._buf and not self._eof:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
            self._buf = memoryview(item)
        out = bytes(self._buf[:want])
        self._buf = self._buf[want:]
        return out

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    @property
    def complete(self) -> bool:
        """Every chunk the producer had was read (or it failed and its error was raised)."""
        return self._eof

    def drain(self) -> None:
        """Read and drop whatever is left, then wait for the producer to finish."""
        while self.read(self.chunk_size):
            pass
        self.close()

    def close(self, timeout: float = 5) -> None:
        """Stop the producer. After everything was read, wait for it to finish; when abandoning
        it, wait only `timeout` seconds (it may be blocked on the network; it is a daemon thread
        and stops at its next chunk)."""
        self._stop.set()
        self._thread.join(timeout=None if self._eof else timeout)
