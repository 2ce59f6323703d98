"""zstd bombs: a stored blob that decompresses to more than its record says is refused at the
record's size, in bounded memory, by the codec, by the registry's upload verification and by fsck;
an upload whose first decompressed bytes cannot begin a delta (a padded giant header, zeros) is
refused at those bytes, without decompressing the rest."""

from __future__ import annotations

import io
import json
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from codec.storage import BlobCorruptError, BlobTooLargeError, decompress_stream
from registry.common.errors import InvalidUploadError
from registry.server.verify import Declared, verify_stream
from tests.support.corpus import FINGERPRINT, StoredDelta, delta_bytes, sha256, storage_form
from tests.support.harness import setup_repo

GiB = 1 << 30


def bomb(path: Path, size: int, *, declare: int | None, window_log: int | None = None) -> Path:
    """`size` zero bytes as one zstd frame (a few KiB), declaring `declare` bytes in its header
    (None: no size; a value other than `size`: a frame that lies)."""
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=window_log or 0, write_content_size=1
    )
    cctx = zstandard.ZstdCompressor(compression_params=params)
    zero = bytes(1 << 20)
    with open(path, "wb") as fh, cctx.stream_writer(fh, size=size, closefd=False) as writer:
        for _ in range(size >> 20):
            writer.write(zero)
    data = bytearray(path.read_bytes())
    if declare != size:
        data = _rewrite_content_size(data, declare)
    path.write_bytes(bytes(data))
    return path


def _rewrite_content_size(frame: bytearray, declare: int | None) -> bytearray:
    fhd = frame[4]
    fcs_flag, single_segment, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    start = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    assert width == 8, "the bomb's frame should carry an 8-byte content size"
    if declare is None:
        raise ValueError("rewriting to 'no size' changes the header length; use write_content_size=False")
    frame[start : start + 8] = struct.pack("<Q", declare)
    return frame


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[int, Path]:
    """4 GiB of zeros declaring 4 GiB, and the same frame declaring 1 MiB (a lie)."""
    root = tmp_path_factory.mktemp("bombs")
    honest = bomb(root / "honest.zst", 4 * GiB, declare=4 * GiB)
    lying = root / "lying.zst"
    lying.write_bytes(bytes(_rewrite_content_size(bytearray(honest.read_bytes()), 1 << 20)))
    return {4 * GiB: honest, 1 << 20: lying}


class _Sink:
    def __init__(self):
        self.n = 0

    def write(self, buf) -> int:
        self.n += len(buf)
        return len(buf)


@pytest.mark.parametrize("declared", [4 * GiB, 1 << 20], ids=["declares-4GiB", "declares-1MiB-holds-4GiB"])
def test_codec_stops_a_bomb_at_the_record_size_in_bounded_memory(bombs, declared):
    path = bombs[declared]
    assert path.stat().st_size < 1 << 20  # 4 GiB of zeros in well under a MiB
    tracemalloc.start()
    sink = _Sink()
    with open(path, "rb") as fh, pytest.raises((BlobTooLargeError, BlobCorruptError)):
        decompress_stream(
            io.BufferedReader(_NoSeek(fh)), sink, max_output_size=1 << 20, expected_raw_digest=None
        )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sink.n <= 2 << 20 and peak < 8 << 20, (sink.n, peak)


class _NoSeek(io.RawIOBase):
    """A non-seekable view of a file, like a network stream (no up-front frame walk)."""

    def __init__(self, fh):
        self.fh = fh

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.fh.read(len(b))
        b[: len(data)] = data
        return len(data)


def test_a_frame_without_a_declared_size_is_refused(tmp_path):
    data = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(10 << 20))
    with pytest.raises(BlobCorruptError, match="does not declare"):
        decompress_stream(io.BytesIO(data), _Sink(), max_output_size=GiB)


@pytest.mark.parametrize("declared", [4 * GiB, 1 << 20], ids=["declares-4GiB", "declares-1MiB-holds-4GiB"])
def test_registry_refuses_a_bomb_upload_without_growing(registry_process, tmp_path, bombs, declared):
    from .test_security import PeakRss

    data = bombs[declared].read_bytes()
    server = registry_process()
    with server.client(timeout=120) as c:
        setup_repo(c, "acme/math")
        real = storage_form(delta_bytes(1))
        # the record says 1 MiB of raw delta: the blob must not decompress past it
        declaration = {
            "digest": sha256(data),
            "size": len(data),
            "raw_digest": real.raw_digest,
            "raw_size": 1 << 20,
        }
        upload = c.post("/v1/repos/acme/math/uploads", json=declaration).json()
        with PeakRss(server.pid) as rss:  # verified as it arrives: refused by the PUT
            r = c.put(upload["upload_url"], content=data)
        assert r.status_code == 422, r.text
        if declared > 1 << 20:  # refused from the frame header alone, naming the record's size
            assert r.json()["error"] == {
                "code": "size_mismatch",
                "message": (
                    "the blob decompresses to more than the declared 1048576 bytes: blob declares 4294967296 "
                    "decompressed bytes, above the allowed 1048576"
                ),
            }
        else:  # the frame lies about its size: corrupt
            assert r.json()["error"]["code"] == "invalid_delta", r.text
        assert rss.grew_mib < 64, f"the server grew by {rss.grew_mib:.0f} MiB refusing a 4 GiB bomb"
        assert c.post(upload["complete_url"]).status_code == 404  # the refused upload was dropped
        assert c.get("/v1/repos/acme/math/versions").json()["items"] == []
        assert list((tmp_path / "data" / "blobs" / "staging").iterdir()) == []


def test_fsck_finds_a_stored_blob_replaced_by_a_bomb(client, make_settings, bombs):
    setup_repo(client, "acme/math")
    real = storage_form(delta_bytes(1))
    from tests.support.harness import http_push

    assert http_push(client, "acme/math", real).status_code == 201
    stored = make_settings().data_dir / "blobs" / "sha256" / real.digest[7:9] / real.digest[7:]
    stored.write_bytes(bombs[4 * GiB].read_bytes())
    tracemalloc.start()
    report = client.get("/v1/admin/fsck").json()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert not report["ok"] and report["digest_mismatches"] == 1, report
    assert peak < 32 << 20


def padded(delta: bytes, header_bytes: int) -> bytes:
    """`delta` (a valid .bdelta) with its JSON header padded with spaces to `header_bytes` bytes:
    still a valid delta, as safetensors allows, and a few KiB once zstd-compressed."""
    (header_len,) = struct.unpack("<Q", delta[:8])
    header = delta[8 : 8 + header_len].rstrip(b" ")
    padding = b" " * (header_bytes - len(header))
    return struct.pack("<Q", header_bytes) + header + padding + delta[8 + header_len :]


def _verify_cpu_seconds(blob: StoredDelta) -> tuple[Exception | None, float]:
    """verify_stream of `blob` as declared: the InvalidUploadError it raised, and its CPU seconds."""
    declared = Declared(blob.digest, blob.size, blob.raw_digest, blob.raw_size)
    started = time.process_time()
    try:
        verify_stream(io.BytesIO(blob.data), declared, max_size=blob.size)
        failure = None
    except InvalidUploadError as exc:
        failure = exc
    return failure, time.process_time() - started


def test_first_bytes_that_cannot_begin_a_delta_stop_the_decompression(bombs):
    """4 GiB of zeros declared as a 4 GiB delta: the first 8 bytes say a header of length 0, and
    nothing more is decompressed (decompressing it all takes seconds of CPU)."""
    data = bombs[4 * GiB].read_bytes()
    zeros = StoredDelta(data, sha256(data), len(data), "sha256:" + "0" * 64, 4 * GiB)
    failure, cpu = _verify_cpu_seconds(zeros)
    assert str(failure) == (
        "upload is not a valid format-v1 delta: its first bytes are not a safetensors header "
        "(header length 0)"
    )
    assert cpu < 0.5, f"{cpu:.2f} s of CPU: the bomb was decompressed"


def test_a_header_that_is_not_a_json_object_is_refused_at_its_first_byte():
    raw = bytearray(delta_bytes(1))
    raw[8] = ord("[")
    failure, _ = _verify_cpu_seconds(storage_form(bytes(raw)))
    assert str(failure) == (
        "upload is not a valid format-v1 delta: its header does not begin a JSON object (first byte 0x5b)"
    )


def test_an_invalid_header_stops_the_decompression_of_a_large_body(tmp_path):
    """A complete header that is not format-v1 (an unknown format_version) is refused before the
    2 GiB of (zero) tensor data behind it are decompressed."""
    body = 2 * GiB
    meta = {
        "format": "deltastore.delta",
        "format_version": "9",
        "codec": "bitdelta",
        "base_model": "org/base",
        "base_fingerprint": FINGERPRINT,
        "dtype": "float16",
    }
    sign = {"dtype": "U8", "shape": [1, 32768, 65536], "data_offsets": [0, body]}
    doc = {"__metadata__": meta, "w.sign": sign}
    header = json.dumps(doc, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "bad-format.zst"
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=True)
    zero = bytes(1 << 20)
    with open(path, "wb") as fh, cctx.stream_writer(fh, size=8 + len(header) + body, closefd=False) as writer:
        writer.write(struct.pack("<Q", len(header)) + header)
        for _ in range(body >> 20):
            writer.write(zero)
    data = path.read_bytes()
    failure, cpu = _verify_cpu_seconds(
        StoredDelta(data, sha256(data), len(data), "sha256:" + "0" * 64, 8 + len(header) + body)
    )
    assert "format_version" in str(failure) and cpu < 0.5, (str(failure), cpu)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read the server's memory")
def test_registry_refuses_a_padded_giant_header_without_holding_it(registry_process):
    """A ~100 KB upload that expands to a valid delta with a 99 MB space-padded header (safetensors
    allows 100 MB) is refused at its first 8 bytes, the server growing by almost nothing (it grew
    by 385 MB before); a header just under the 16 MiB limit is accepted, in bounded memory."""
    from .test_security import PeakRss

    giant = storage_form(padded(delta_bytes(3), 99_000_000))
    near = storage_form(padded(delta_bytes(4), (16 << 20) - 4096))
    assert giant.size < 200_000 and near.size < 100_000
    server = registry_process()
    with server.client(timeout=120) as c:
        setup_repo(c, "acme/math")
        rss = {}
        for name, blob in (("giant", giant), ("near", near)):
            upload = c.post("/v1/repos/acme/math/uploads", json=blob.declaration()).json()
            with PeakRss(server.pid) as peak:  # verified as it arrives: the PUT refuses
                r = c.put(upload["upload_url"], content=blob.data)
                if r.status_code == 200:
                    r = c.post(upload["complete_url"])
            rss[name] = (r, peak.grew_mib)
        r, grew = rss["giant"]
        assert r.status_code == 422 and r.json()["error"] == {
            "code": "invalid_delta",
            "message": (
                "upload is not a valid format-v1 delta: its header would be 99000000 bytes, above this "
                f"registry's limit of {16 << 20} bytes for a delta's header"
            ),
        }
        assert grew < 16, f"the server grew by {grew:.0f} MiB refusing a 99 MB header"
        r, grew = rss["near"]
        assert r.status_code == 201, r.text
        # at most three copies while it is parsed: the collected bytes, the parser's slice, its text
        assert grew < 64, f"the server grew by {grew:.0f} MiB for a 16 MiB header"
        assert [v["number"] for v in c.get("/v1/repos/acme/math/versions").json()["items"]] == [1]
