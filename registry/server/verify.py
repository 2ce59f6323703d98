"""Verification of an upload's bytes in one streaming pass: sha256 and size of the stored (zstd)
bytes, one frame decompressing to exactly the declared raw size (and raw sha256, where declared),
and a valid format-v1 header (read from the first decompressed bytes; no torch)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import zstandard

from codec.container import MAX_HEADER_SIZE, Header
from codec.errors import InvalidDeltaError
from codec.format import DeltaEntry, validate_delta_header
from codec.storage import BlobCorruptError, BlobTooLargeError, decompress_stream
from registry.common.errors import (
    DigestMismatchError,
    InvalidUploadError,
    SizeMismatchError,
    UploadTooLargeError,
)
from registry.common.readahead import CHUNK, ReadAhead
from registry.server.settings import DEFAULT_MAX_HEADER_BYTES


@dataclass(frozen=True)
class Declared:
    """What the bytes must be. A streamed push declares only `raw_size` before its bytes arrive;
    the rest is checked against what the bytes turn out to be once the client names it."""

    digest: str | None
    size: int | None
    raw_digest: str | None
    raw_size: int


@dataclass(frozen=True)
class Verified:
    """What verified bytes are: their digests and sizes, and their parsed header."""

    digest: str
    size: int
    raw_digest: str
    raw_size: int
    header: Header
    entries: dict[str, DeltaEntry]


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


def _header_length(prefix: bytes | bytearray, raw_size: int, limit: int) -> int:
    """The header length a delta of `raw_size` bytes states in its first 8 bytes, or
    InvalidUploadError when no delta's header could have it."""
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len < 2:  # the shortest JSON object, `{}`
        raise InvalidUploadError(
            "upload is not a valid format-v1 delta: its first bytes are not a safetensors header "
            f"(header length {header_len})"
        )
    if header_len > limit:
        raise InvalidUploadError(
            f"upload is not a valid format-v1 delta: its header would be {header_len} bytes, above this "
            f"registry's limit of {limit} bytes for a delta's header"
        )
    if 8 + header_len > raw_size:
        raise InvalidUploadError(
            f"upload is not a valid format-v1 delta: its header would be {header_len} bytes, but the delta "
            f"is {raw_size} bytes in all"
        )
    return header_len


class _HeaderSink:
    """Collects the safetensors length prefix and JSON header of the decompressed stream and
    drops the rest. It refuses (InvalidUploadError, which stops the decompression) as soon as the
    bytes so far cannot begin a delta of `raw_size` bytes: a length no delta's header has, a header
    that does not open a JSON object, or a complete header that is not a valid format-v1 one; the
    header is parsed once complete and its bytes released."""

    _JSON_WHITESPACE = b" \t\n\r"

    def __init__(self, raw_size: int, limit: int) -> None:
        self.raw_size, self.limit = raw_size, limit
        self.prefix = bytearray()
        self.want = 8  # the length first, then the whole header
        self.opened = False  # the header's first non-whitespace byte, `{`, has been seen
        self.parsed: tuple[Header, dict[str, DeltaEntry]] | None = None

    def write(self, buf) -> int:
        view = memoryview(buf)
        while view and self.parsed is None:
            take = view[: self.want - len(self.prefix)]
            self.prefix += take
            view = view[len(take) :]
            if self.want == 8:
                if len(self.prefix) == 8:
                    self.want = 8 + _header_length(self.prefix, self.raw_size, self.limit)
                continue
            if not self.opened:
                self._check_opening(take)
            if len(self.prefix) == self.want:
                self.parsed = _validate_header(self.prefix, self.raw_size)
                self.prefix = bytearray()
        return len(buf)

    def _check_opening(self, chunk: memoryview) -> None:
        rest = bytes(chunk).lstrip(self._JSON_WHITESPACE)  # JSON (and safetensors) allow leading whitespace
        if rest:
            if rest[0] != ord("{"):
                raise InvalidUploadError(
                    "upload is not a valid format-v1 delta: its header does not begin a JSON object "
                    f"(first byte 0x{rest[0]:02x})"
                )
            self.opened = True


@dataclass
class Scan:
    """What one pass over stored bytes found, before it is judged against what they must be: the
    stored bytes' sha256 and count (`overflow`: more than the pass's limit came), the bytes they
    decompress to and their sha256, the parsed header, and the failure that stopped the
    decompression, if one did."""

    digest: str
    size: int
    overflow: bool
    written: int
    raw_digest: str
    parsed: tuple[Header, dict[str, DeltaEntry]] | None
    failure: Exception | None

    def judge(self, declared: Declared, *, max_size: int) -> Verified:
        """The verified bytes, or the error that best explains why they are not what `declared`
        says (a stored-digest mismatch before a corrupt stream, as a corrupt stream follows
        from it)."""
        if self.overflow and declared.size is None:
            raise UploadTooLargeError(
                f"received more than the {max_size} bytes this upload may bring (what its raw size "
                "can compress to, within this registry's limit)"
            )
        if self.overflow:
            raise SizeMismatchError(f"received more than the {declared.size} bytes the upload declared")
        if declared.size is not None and self.size != declared.size:
            raise SizeMismatchError(f"received {self.size} bytes but the upload declared {declared.size}")
        if declared.digest is not None and self.digest != declared.digest:
            raise DigestMismatchError(
                f"received bytes have digest {self.digest}, but the upload declared {declared.digest}"
            )
        if self.failure is not None:
            _raise_stream_failure(self.failure, declared)
        if self.written != declared.raw_size:
            raise SizeMismatchError(
                f"the blob decompresses to {self.written} bytes, but the upload declared {declared.raw_size}"
            )
        if self.parsed is None:  # fewer bytes than its header needs: decompress_stream refuses that first
            raise InvalidUploadError("upload is not a valid format-v1 delta: it ends inside its header")
        header, entries = self.parsed
        verified = Verified(self.digest, self.size, self.raw_digest, self.written, header, entries)
        check_named(verified, declared)  # a raw digest named only now
        return verified


def scan_stream(
    src: IO[bytes],
    raw_size: int,
    *,
    limit: int,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    expected_raw_digest: str | None = None,
    read_all: bool = True,
) -> Scan:
    """Read the stored bytes from `src` in one pass (at most `limit`, plus one byte to see an
    overflow): hash them while decompressing them as one zstd frame of at most `raw_size` bytes,
    whose first bytes must begin a delta's header (a header over `max_header_bytes`, or first
    bytes that cannot begin a delta, stop the decompression at once). After a failure the rest
    is still read and hashed when `read_all` (so that a digest named later can explain it),
    else the pass stops there."""
    reader = _HashingReader(src, limit)
    sink = _HeaderSink(raw_size, max_header_bytes)
    failure: Exception | None = None
    written, raw_digest = -1, ""
    try:
        written, raw_digest = decompress_stream(
            reader, sink, max_output_size=raw_size, expected_raw_digest=expected_raw_digest
        )
    except (BlobCorruptError, BlobTooLargeError, InvalidUploadError) as exc:
        failure = exc
    if failure is not None and not read_all:
        reader.close()
    else:
        reader.drain()
    return Scan(reader.digest, reader.n, reader.overflow, written, raw_digest, sink.parsed, failure)


def verify_stream(
    src: IO[bytes],
    declared: Declared,
    *,
    max_size: int,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> Verified:
    """Read the whole stored blob from `src` and check it against `declared`; return what it is.
    At most `max_size` stored bytes are read (the declared size, else the registry's limit). A
    header over `max_header_bytes`, or first bytes that cannot begin a delta, stop the
    decompression at once; the stored bytes are then still read to check their declared size
    and digest, when there are any to check (else the refusal is immediate)."""
    scan = scan_stream(
        src,
        declared.raw_size,
        limit=declared.size if declared.size is not None else max_size,
        max_header_bytes=max_header_bytes,
        expected_raw_digest=declared.raw_digest,
        read_all=declared.digest is not None,
    )
    if scan.failure is not None and declared.digest is None and not scan.overflow:
        _raise_stream_failure(scan.failure, declared)  # nothing declared explains it better: refuse now
    return scan.judge(declared, max_size=max_size)


def _raise_stream_failure(failure: Exception, declared: Declared) -> None:
    if isinstance(failure, InvalidUploadError):
        raise failure
    if isinstance(failure, BlobTooLargeError):
        raise SizeMismatchError(
            f"the blob decompresses to more than the declared {declared.raw_size} bytes: {failure}"
        ) from None
    if "does not match the expected" in str(failure):
        raise DigestMismatchError(
            f"the blob does not decompress to the declared {declared.raw_size} "
            f"bytes with digest {declared.raw_digest}: {failure}"
        ) from None
    raise InvalidUploadError(f"upload is not a zstd-compressed delta: {failure}") from None


def check_named(received: Verified, named: Declared) -> None:
    """The digests and sizes a client names at `complete` must be those of the bytes received
    (a mismatch is a corruption on the way, or a client that lost track of its bytes)."""
    if named.size is not None and named.size != received.size:
        raise SizeMismatchError(f"received {received.size} bytes but the upload declared {named.size}")
    if named.digest is not None and named.digest != received.digest:
        raise DigestMismatchError(
            f"received bytes have digest {received.digest}, but the upload declared {named.digest}"
        )
    if named.raw_size != received.raw_size:
        raise SizeMismatchError(
            f"the blob decompresses to {received.raw_size} bytes, but the upload declared {named.raw_size}"
        )
    if named.raw_digest is not None and named.raw_digest != received.raw_digest:
        raise DigestMismatchError(
            f"the blob does not decompress to the declared {named.raw_size} bytes with digest "
            f"{named.raw_digest} (it decompresses to {received.raw_digest})"
        )


def read_header(src: IO[bytes], raw_size: int) -> tuple[Header, dict[str, DeltaEntry]]:
    """The header of an already verified stored blob, decompressing only its beginning (stored
    blobs were accepted under the format's own header limit)."""
    sink = _HeaderSink(raw_size, MAX_HEADER_SIZE)
    with zstandard.ZstdDecompressor().stream_reader(src, read_size=64 << 10, closefd=False) as reader:
        while sink.parsed is None and (buf := reader.read(64 << 10)):
            sink.write(buf)
    if sink.parsed is None:
        raise InvalidUploadError("upload is not a valid format-v1 delta: it ends inside its header")
    return sink.parsed


def _validate_header(prefix: bytes | bytearray, raw_size: int) -> tuple[Header, dict[str, DeltaEntry]]:
    try:
        return validate_delta_header(prefix, raw_size)
    except InvalidDeltaError as exc:
        raise InvalidUploadError(f"upload is not a valid format-v1 delta: {exc}") from None
