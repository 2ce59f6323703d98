"""One background thread that runs I/O-bound steps (hashing, file writes) in submission order,
so they overlap with the tensor math of the next step. Both release the GIL."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class OrderedWorker:
    """Runs submitted callables one at a time, in order, on a daemon thread.

    At most `depth` steps wait in the queue (bounding the memory they hold). The first error
    raised by a step is re-raised in the caller at the next `submit` or at `join`.

        with OrderedWorker() as io:
            io.submit(lambda: fh.write(buf))
    """

    def __init__(self, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="deltastore-io", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            step = self._queue.get()
            if step is None:
                return
            if self._error is None:
                try:
                    step()
                except BaseException as exc:  # handed to the caller
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, step: Callable[[], object]) -> None:
        self._raise()
        self._queue.put(step)

    def join(self) -> None:
        """Wait for every submitted step; re-raise the first error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def abandon(self) -> None:
        """Stop after the queued steps without raising: the caller is already failing."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._error = None

    def __enter__(self) -> OrderedWorker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.join()
        else:
            self.abandon()
