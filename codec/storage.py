"""The registry's storage form of a delta: one zstd frame (content size in the frame header),
addressed by the sha256 of the stored bytes. Streaming both ways; decompression has a hard cap.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import IO

import zstandard

from .errors import InvalidDeltaError
from .files import CHUNK, AtomicWriter

DEFAULT_LEVEL = 3


class BlobTooLargeError(InvalidDeltaError):
    """Decompressing would produce more bytes than the record allows (zip-bomb guard)."""


class BlobCorruptError(InvalidDeltaError):
    """The stored bytes are not one valid zstd frame, or their digest is not the expected one."""


@dataclass(frozen=True)
class BlobInfo:
    digest: str  # sha256:<hex> of the stored (compressed) bytes
    size: int
    raw_digest: str  # sha256:<hex> of the decompressed .bdelta
    raw_size: int


class _HashingReader:
    def __init__(self, fh: IO[bytes]):
        self.fh, self.sha, self.n = fh, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        buf = self.fh.read(n)
        self.sha.update(buf)
        self.n += len(buf)
        return buf


class _HashingWriter:
    def __init__(self, fh: IO[bytes]):
        self.fh, self.sha, self.n = fh, hashlib.sha256(), 0

    def write(self, buf) -> int:
        self.sha.update(buf)
        self.n += len(buf)
        return self.fh.write(buf)


def compress_blob(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, level: int = DEFAULT_LEVEL, threads: int = 0
) -> BlobInfo:
    """zstd-compress the file `src` into `dst` (atomically, see codec.files.AtomicWriter)."""
    raw_size = os.stat(src).st_size
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, threads=threads)
    with open(src, "rb") as fin, AtomicWriter(dst, inputs=[src]) as fout:
        reader, writer = _HashingReader(fin), _HashingWriter(fout)
        cctx.copy_stream(reader, writer, size=raw_size, read_size=CHUNK, write_size=CHUNK)
        if reader.n != raw_size:
            raise OSError(f"{src} changed size while being compressed")
    return BlobInfo(
        "sha256:" + writer.sha.hexdigest(), writer.n, "sha256:" + reader.sha.hexdigest(), reader.n
    )


def declared_content_size(prefix: bytes) -> int | None:
    """The decompressed size a zstd frame header declares, or None when it declares none."""
    try:
        size = zstandard.frame_content_size(prefix)
    except zstandard.ZstdError as exc:
        raise BlobCorruptError(f"not a zstd frame: {exc}") from None
    return None if size < 0 else size


def frame_compressed_size(fh: IO[bytes]) -> int:
    """Length in bytes of the zstd frame starting at the current position of a seekable file,
    found by walking the block headers (cheap: one small read per 128 KiB block). The file
    position is restored."""
    start = fh.tell()
    try:
        head = fh.read(18)
        try:
            params = zstandard.get_frame_parameters(head)
            pos = start + zstandard.frame_header_size(head)
        except zstandard.ZstdError as exc:
            raise BlobCorruptError(f"not a zstd frame: {exc}") from None
        while True:
            fh.seek(pos)
            block = fh.read(3)
            if len(block) < 3:
                raise BlobCorruptError("zstd frame is truncated")
            value = int.from_bytes(block, "little")
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            if kind == 3:
                raise BlobCorruptError("zstd frame has a reserved block type")
            pos += 3 + (1 if kind == 1 else size)
            if last:
                break
        return pos - start + (4 if params.has_checksum else 0)
    finally:
        fh.seek(start)


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _FrameTracker:
    """Follows the block structure of one zstd frame as its compressed bytes stream past, so a
    frame cut short (even only in its checksum) or followed by anything is caught without seeking:
    the decompressor alone returns all content of a frame whose checksum is missing."""

    def __init__(self, header_size: int, has_checksum: bool):
        self.need = header_size  # bytes left in the current segment (frame header, block body, checksum)
        self.last = False  # the current block is the frame's last
        self.has_checksum = has_checksum
        self.in_checksum = False
        self.done = False
        self.extra = 0  # bytes after the end of the frame
        self._block_header = b""

    def feed(self, buf: bytes) -> None:
        i, n = 0, len(buf)
        while i < n:
            if self.done:
                self.extra += n - i
                return
            if self.need:
                take = min(self.need, n - i)
                self.need -= take
                i += take
                self._segment_end()
                continue
            take = min(3 - len(self._block_header), n - i)
            self._block_header += buf[i : i + take]
            i += take
            if len(self._block_header) == 3:
                value = int.from_bytes(self._block_header, "little")
                self._block_header = b""
                self.last, kind, size = bool(value & 1), (value >> 1) & 3, value >> 3
                if kind == 3:
                    raise BlobCorruptError("zstd frame has a reserved block type")
                self.need = 1 if kind == 1 else size
                self._segment_end()

    def _segment_end(self) -> None:
        if self.need or self._block_header:
            return
        if self.in_checksum:
            self.done = True
        elif self.last:
            if self.has_checksum:
                self.in_checksum, self.need = True, 4
            else:
                self.done = True


def decompress_stream(
    src: IO[bytes],
    dst: IO[bytes],
    *,
    max_output_size: int,
    expected_raw_digest: str | None = None,
) -> tuple[int, str]:
    """Decompress one zstd frame from `src` into `dst`, never writing more than `max_output_size`
    bytes; the frame must declare its content size and nothing may follow it. Returns (bytes
    written, sha256 of them)."""
    if getattr(src, "seekable", None) and src.seekable():
        here = src.tell()
        total = src.seek(0, os.SEEK_END) - here
        src.seek(here)
        if frame_compressed_size(src) != total:
            raise BlobCorruptError(
                "blob is not exactly one zstd frame (data follows the frame, or it is cut short)"
            )
    head = src.read(18)  # the largest possible frame header
    if not head.startswith(ZSTD_MAGIC):
        raise BlobCorruptError("not a zstd frame (bad magic number)")
    declared = declared_content_size(head)
    if declared is None:
        raise BlobCorruptError("zstd frame header does not declare the content size")
    if declared > max_output_size:
        raise BlobTooLargeError(
            f"blob declares {declared} decompressed bytes, above the allowed {max_output_size}"
        )
    try:
        tracker = _FrameTracker(
            zstandard.frame_header_size(head), zstandard.get_frame_parameters(head).has_checksum
        )
    except zstandard.ZstdError as exc:
        raise BlobCorruptError(f"not a zstd frame: {exc}") from None
    dctx = zstandard.ZstdDecompressor()
    sha = hashlib.sha256()
    written = 0

    class _Prefixed:
        def __init__(self):
            self.head = head

        def read(self, n: int = -1) -> bytes:
            if self.head:
                out, self.head = self.head, b""
            else:
                out = src.read(n)
            tracker.feed(out)
            return out

    try:
        with dctx.stream_reader(_Prefixed(), read_size=CHUNK, read_across_frames=False) as reader:
            while True:
                buf = reader.read(CHUNK)
                if not buf:
                    break
                written += len(buf)
                if written > declared:
                    raise BlobCorruptError(f"blob decompresses to more than the {declared} bytes it declares")
                if written > max_output_size:
                    raise BlobTooLargeError(
                        f"blob decompresses to more than the allowed {max_output_size} bytes"
                    )
                sha.update(buf)
                dst.write(buf)
    except zstandard.ZstdError as exc:
        raise BlobCorruptError(f"corrupt zstd stream: {exc}") from None
    tracker.feed(src.read(1))
    if written != declared or not tracker.done or tracker.extra:
        # Less output or an unfinished frame means it was cut short; more output than declared
        # means a second frame; leftover input means trailing junk.
        raise BlobCorruptError(f"blob is not exactly one zstd frame of {declared} bytes")
    digest = "sha256:" + sha.hexdigest()
    if expected_raw_digest is not None and digest != expected_raw_digest:
        raise BlobCorruptError(
            f"decompressed digest {digest} does not match the expected {expected_raw_digest}"
        )
    return written, digest


def decompress_blob(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    max_output_size: int,
    expected_raw_digest: str | None = None,
) -> tuple[int, str]:
    """File-to-file `decompress_stream`, written atomically (see codec.files.AtomicWriter)."""
    with open(src, "rb") as fin, AtomicWriter(dst, inputs=[src]) as fout:
        return decompress_stream(
            fin, fout, max_output_size=max_output_size, expected_raw_digest=expected_raw_digest
        )
