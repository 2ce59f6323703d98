"""zstd storage form: digests, one frame with its content size, the decompression cap."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
import zstandard

from codec.files import sha256_file
from codec.storage import (
    BlobCorruptError,
    BlobTooLargeError,
    compress_blob,
    decompress_blob,
    decompress_stream,
)


@pytest.fixture()
def payload(tmp_path):
    path = tmp_path / "raw.bdelta"
    path.write_bytes(os.urandom(50_000) + b"\x00" * 3_000_000)
    return path


def test_round_trip_and_digests(payload, tmp_path):
    info = compress_blob(payload, tmp_path / "blob.zst")
    stored = (tmp_path / "blob.zst").read_bytes()
    raw = payload.read_bytes()
    assert info.digest == "sha256:" + hashlib.sha256(stored).hexdigest() == sha256_file(tmp_path / "blob.zst")
    assert info.raw_digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert (info.size, info.raw_size) == (len(stored), len(raw))
    assert info.size < info.raw_size
    assert zstandard.frame_content_size(stored) == len(raw)  # content size is in the frame header
    n, digest = decompress_blob(
        tmp_path / "blob.zst", tmp_path / "out", max_output_size=len(raw), expected_raw_digest=info.raw_digest
    )
    assert (n, digest) == (len(raw), info.raw_digest)
    assert (tmp_path / "out").read_bytes() == raw


def test_declared_size_above_cap_is_refused_before_decompressing(payload, tmp_path):
    compress_blob(payload, tmp_path / "blob.zst")
    with pytest.raises(BlobTooLargeError, match="declares 3050000"):
        decompress_blob(tmp_path / "blob.zst", tmp_path / "out", max_output_size=1_000_000)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.incomplete").exists()


def test_bomb_without_content_size_is_refused():
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    bomb = cobj.compress(b"\0" * 20_000_000) + cobj.flush()
    assert len(bomb) < 5_000
    with pytest.raises(BlobCorruptError, match="does not declare the content size"):
        decompress_stream(io.BytesIO(bomb), io.BytesIO(), max_output_size=10**9)


def test_frame_lying_about_its_size_stops_at_the_cap():
    """A frame header that under-declares its content: output stops at the cap, never beyond."""
    raw = b"\0" * 5_000_000
    frame = bytearray(zstandard.ZstdCompressor(write_content_size=True).compress(raw))
    sink = io.BytesIO()
    second = zstandard.ZstdCompressor(write_content_size=True).compress(raw)
    with pytest.raises((BlobTooLargeError, BlobCorruptError)):
        decompress_stream(io.BytesIO(bytes(frame) + second), sink, max_output_size=6_000_000)
    assert sink.tell() <= 6_000_000


@pytest.mark.parametrize("suffix", [b"junk", b"\x28\xb5\x2f\xfd"])
def test_trailing_data_is_refused(payload, tmp_path, suffix):
    compress_blob(payload, tmp_path / "blob.zst")
    blob = (tmp_path / "blob.zst").read_bytes() + suffix
    with pytest.raises(BlobCorruptError):
        decompress_stream(io.BytesIO(blob), io.BytesIO(), max_output_size=10**8)


def test_corrupt_and_non_zstd_input(payload, tmp_path):
    info = compress_blob(payload, tmp_path / "blob.zst")
    blob = bytearray((tmp_path / "blob.zst").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(BlobCorruptError):
        decompress_stream(
            io.BytesIO(bytes(blob)), io.BytesIO(), max_output_size=10**8, expected_raw_digest=info.raw_digest
        )
    with pytest.raises(BlobCorruptError, match="not a zstd frame"):
        decompress_stream(io.BytesIO(b"PK\x03\x04 not zstd at all......"), io.BytesIO(), max_output_size=10)


def test_wrong_expected_digest(payload, tmp_path):
    compress_blob(payload, tmp_path / "blob.zst")
    with pytest.raises(BlobCorruptError, match="does not match"):
        decompress_blob(
            tmp_path / "blob.zst",
            tmp_path / "out",
            max_output_size=10**8,
            expected_raw_digest="sha256:" + "0" * 64,
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cut", [1, 100, 2000])
def test_truncated_blob_is_refused(payload, tmp_path, cut):
    compress_blob(payload, tmp_path / "blob.zst")
    blob = (tmp_path / "blob.zst").read_bytes()[:-cut]
    with pytest.raises(BlobCorruptError):
        decompress_stream(io.BytesIO(blob), io.BytesIO(), max_output_size=10**8)
