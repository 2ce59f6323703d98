"""The read-ahead stream shared by the client's downloads and the server's upload verification:
bytes in order at any read size, the producer's error handed to the reader after the bytes
before it, a bounded lead, and an abandoned producer stopped with its clean-up run."""

from __future__ import annotations

import os
import threading
import time

import pytest

from registry.common.readahead import ReadAhead


def test_reads_every_byte_in_order_at_any_read_size():
    chunks = [os.urandom(n) for n in (1, 1000, 0, 65536, 7, 300_000)]
    stream = ReadAhead(iter(chunks), chunk_size=4096)
    got = bytearray()
    sizes = iter([1, 3, 5000, -1, 100_000, 2, None] * 100)
    while data := stream.read(next(sizes)):
        got += data
    assert bytes(got) == b"".join(chunks) and stream.complete and stream.error is None
    assert stream.read(10) == b""  # stays at end of stream
    stream.close()


def test_the_producers_error_follows_the_bytes_before_it():
    def chunks():
        yield b"abc"
        yield b"def"
        raise OSError("disk gone")

    stream = ReadAhead(chunks())
    assert stream.read(4) == b"abc"  # one chunk at most per read
    assert stream.read(-1) == b"def"
    with pytest.raises(OSError, match="disk gone"):
        stream.read()
    assert isinstance(stream.error, OSError) and stream.complete
    stream.close()


def test_the_producer_stays_at_most_depth_chunks_ahead():
    made = []

    def chunks():
        for i in range(100):
            made.append(i)
            yield bytes([i])

    stream = ReadAhead(chunks(), depth=3)
    time.sleep(0.3)
    assert len(made) <= 3 + 2  # the queue, plus the chunk being put and the one being made
    assert b"".join(iter(lambda: stream.read(), b"")) == bytes(range(100))
    stream.close()


def test_closing_early_stops_the_producer_and_runs_its_clean_up():
    cleaned = threading.Event()

    def chunks():
        try:
            while True:
                yield b"x" * 1024
        finally:
            cleaned.set()

    stream = ReadAhead(chunks(), depth=2)
    assert stream.read(1) == b"x"
    started = time.monotonic()
    stream.close()
    assert cleaned.wait(5) and time.monotonic() - started < 5
    assert not stream._thread.is_alive()
