"""Verification of an upload's bytes in one streaming pass: sha256 and size of the stored (zstd)
bytes, one frame decompressing to exactly the declared size and raw sha256, and a valid format-v1
header (read from the first decompressed bytes; no torch)."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import IO, Iterator

import zstandard

from codec.container import MAX_HEADER_SIZE, Header
from codec.errors import InvalidDeltaError
from codec.format import DeltaEntry, validate_delta_header
from codec.storage import BlobCorruptError, BlobTooLargeError, decompress_stream

from registry.common.errors import DigestMismatchError, InvalidUploadError
from registry.common.readahead import CHUNK, ReadAhead


@dataclass(frozen=True)
class Declared:
    digest: str
    size: int
    raw_digest: str
    raw_size: int


class _HashingReader(ReadAhead):
    """Reads `src` ahead in a background thread, hashing as it goes, so that the network read,
    the stored-bytes hash and the decompressor overlap. Never reads more than `limit` + 1 bytes."""

    def __init__(self, src: IO[bytes], limit: int):
        self.limit, self.n, self.overflow = limit, 0, False
        self.sha = hashlib.sha256()
        super().__init__(self._chunks(src), chunk_size=CHUNK)

    def _chunks(self, src: IO[bytes]) -> Iterator[bytes]:
        while buf := src.read(min(CHUNK, self.limit - self.n + 1)):
            if self.n + len(buf) > self.limit:
                self.overflow = True
                buf = buf[: self.limit - self.n]
            self.n += len(buf)
            self.sha.update(buf)
            yield buf
            if self.overflow:
                return

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


class _HeaderSink:
    """Keeps the safetensors length prefix and JSON header of the decompressed stream, drops the rest."""

    def __init__(self) -> None:
        self.prefix = bytearray()
        self.want = 8

    def write(self, buf) -> int:
        if len(self.prefix) < self.want:
            self.prefix += bytes(buf[: self.want - len(self.prefix)])
            if self.want == 8 and len(self.prefix) == 8:
                (header_len,) = struct.unpack("<Q", self.prefix)
                self.want = 8 + min(header_len, MAX_HEADER_SIZE)
                self.prefix += bytes(buf[8 : self.want])
        return len(buf)


def verify_stream(src: IO[bytes], declared: Declared) -> tuple[Header, dict[str, DeltaEntry]]:
    """Read the whole stored blob from `src` and check it against `declared`; return its parsed header."""
    reader = _HashingReader(src, declared.size)
    sink = _HeaderSink()
    failure: Exception | None = None
    written = -1
    try:
        written, _ = decompress_stream(reader, sink, max_output_size=declared.raw_size, expected_raw_digest=declared.raw_digest)
    except (BlobCorruptError, BlobTooLargeError) as exc:
        failure = exc
    reader.drain()  # a stored-digest mismatch explains a corrupt stream better than the stream error does
    if reader.overflow or reader.n != declared.size:
        raise DigestMismatchError(
            f"received {'more than ' if reader.overflow else ''}{reader.n} bytes but the upload declared {declared.size}"
        )
    if reader.digest != declared.digest:
        raise DigestMismatchError(f"received bytes have digest {reader.digest}, but the upload declared {declared.digest}")
    if failure is not None:
        if isinstance(failure, BlobTooLargeError) or "does not match the expected" in str(failure):
            raise DigestMismatchError(
                f"the blob does not decompress to the declared {declared.raw_size} bytes with digest {declared.raw_digest}: {failure}"
            ) from None
        raise InvalidUploadError(f"upload is not a zstd-compressed delta: {failure}") from None
    if written != declared.raw_size:
        raise DigestMismatchError(f"the blob decompresses to {written} bytes, but the upload declared {declared.raw_size}")
    return _validate_header(bytes(sink.prefix), declared.raw_size)


def read_header(src: IO[bytes], raw_size: int) -> tuple[Header, dict[str, DeltaEntry]]:
    """The header of an already verified stored blob, decompressing only its beginning."""
    with zstandard.ZstdDecompressor().stream_reader(src, read_size=64 << 10, closefd=False) as reader:
        prefix = reader.read(8)
        if len(prefix) == 8:
            (header_len,) = struct.unpack("<Q", prefix)
            want = min(header_len, MAX_HEADER_SIZE)
            while len(prefix) < 8 + want and (buf := reader.read(8 + want - len(prefix))):
                prefix += buf
    return _validate_header(prefix, raw_size)


def _validate_header(prefix: bytes, raw_size: int) -> tuple[Header, dict[str, DeltaEntry]]:
    try:
        return validate_delta_header(prefix, raw_size)
    except InvalidDeltaError as exc:
        raise InvalidUploadError(f"upload is not a valid format-v1 delta: {exc}") from None
