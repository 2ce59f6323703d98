"""registry.client.transfer: the storage form made as the file is read, part uploads and
downloads against a real blob server on 127.0.0.1: every byte lands where it belongs, parts are
made as they are sent in bounded memory, a cut download keeps its bytes and resumes with Range,
and bytes that are not the recorded blob are refused and leave nothing behind."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from codec.storage import BlobInfo, compress_blob
from registry.client.errors import CorruptDownloadError, NetworkError, TransferInterruptedError
from registry.client.transfer import StorageForm, part_etag, receive_blob, upload_parts


class BlobServer:
    """GET /blob serves `blob` (honouring `Range: bytes=N-`), cut after `cut_after` body bytes
    when set; PUT /part/<n> stores the body (after `delay[n]` seconds), or answers `refuse[n]` =
    (status, body)."""

    def __init__(self):
        self.blob = b""
        self.cut_after: int | None = None
        self.refuse: dict[int, tuple[int, bytes]] = {}
        self.parts: dict[int, bytes] = {}
        self.delay: dict[int, float] = {}
        self.arrived: list[int] = []
        self.keep = True  # False: keep only each part's size and sha256 (a memory measurement)
        self.ranges: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                range_header = self.headers.get("Range")
                outer.ranges.append(range_header)
                start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1)) if range_header else 0
                body = outer.blob[start:]
                self.send_response(206 if range_header else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_after is not None:
                    self.wfile.write(body[: outer.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

            def do_PUT(self):
                number = int(self.path.split("?")[0].rsplit("/", 1)[1])
                outer.arrived.append(number)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(outer.delay.get(number, 0))
                status, answer = outer.refuse.get(number, (200, b""))
                if status == 200 and len(body) == int(self.headers["Content-Length"]):
                    outer.parts[number] = body if outer.keep else (len(body), hashlib.sha256(body).digest())
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                if status == 200:  # as S3 answers a part PUT
                    self.send_header("ETag", part_etag(body))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def server():
    s = BlobServer()
    yield s
    s.server.shutdown()
    s.server.server_close()


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> tuple[bytes, bytes, BlobInfo]:
    """A delta-like file (3 MiB, several network chunks even compressed) and its storage form."""
    folder = tmp_path_factory.mktemp("blob")
    raw = os.urandom(2 << 20) + bytes(1 << 20)
    (folder / "raw").write_bytes(raw)
    info = compress_blob(folder / "raw", folder / "raw.zst")
    return raw, (folder / "raw.zst").read_bytes(), info


def _download(server: BlobServer, tmp_path: Path, expected: BlobInfo, offset: int = 0):
    partial, dest = tmp_path / "blob.zst.incomplete", tmp_path / "blob.bdelta"
    moved: list[int] = []
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with httpx.Client() as http, http.stream("GET", server.url + "/blob", headers=headers) as response:
        receive_blob(
            response.iter_bytes(),
            partial=partial,
            offset=offset,
            dest=dest,
            expected=expected,
            advance=moved.append,
        )
    return partial, dest, moved


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


# --- downloads -------------------------------------------------------------------------------


def test_a_download_lands_decompressed_and_its_partial_is_removed(server, stored, tmp_path):
    raw, blob, info = stored
    server.blob = blob
    partial, dest, moved = _download(server, tmp_path, info)
    assert dest.read_bytes() == raw and not partial.exists()
    assert sum(moved) == len(blob) and _leftovers(tmp_path) == ["blob.bdelta"]


def test_a_cut_download_keeps_its_bytes_and_resumes_with_range(server, stored, tmp_path):
    raw, blob, info = stored
    server.blob, server.cut_after = blob, len(blob) // 2
    with pytest.raises(TransferInterruptedError) as err:
        _download(server, tmp_path, info)
    got = re.fullmatch(
        rf"download stopped after (\d+) of {len(blob)} bytes \((.+)\); pull again to resume", str(err.value)
    )
    assert got, str(err.value)
    partial, dest = tmp_path / "blob.zst.incomplete", tmp_path / "blob.bdelta"
    kept = partial.read_bytes()
    assert len(kept) == int(got.group(1)) == len(blob) // 2 and kept == blob[: len(kept)]
    assert not dest.exists() and _leftovers(tmp_path) == ["blob.zst.incomplete"]  # no temp output left

    server.cut_after = None
    _, dest, moved = _download(server, tmp_path, info, offset=len(kept))
    assert server.ranges[-1] == f"bytes={len(kept)}-"
    assert dest.read_bytes() == raw and sum(moved) == len(blob) - len(kept)  # only the new bytes
    assert _leftovers(tmp_path) == ["blob.bdelta"]


def test_a_partial_longer_than_the_offset_is_cut_back_to_it(server, stored, tmp_path):
    raw, blob, info = stored
    server.blob = blob
    (tmp_path / "blob.zst.incomplete").write_bytes(blob[:1000] + b"stale bytes from an older attempt")
    _, dest, _ = _download(server, tmp_path, info, offset=1000)
    assert dest.read_bytes() == raw


def test_corrupt_bytes_are_refused_and_leave_nothing_behind(server, stored, tmp_path):
    raw, blob, info = stored
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    server.blob = bytes(flipped)
    with pytest.raises(CorruptDownloadError):
        _download(server, tmp_path, info)
    assert _leftovers(tmp_path) == []  # wrong bytes are no base for a resume


def test_a_corrupt_kept_partial_fails_the_resume_and_is_dropped(server, stored, tmp_path):
    raw, blob, info = stored
    server.blob = blob
    (tmp_path / "blob.zst.incomplete").write_bytes(b"\0" * 1000)  # not the blob's first bytes
    with pytest.raises(CorruptDownloadError):
        _download(server, tmp_path, info, offset=1000)
    assert _leftovers(tmp_path) == []


def test_valid_bytes_with_another_stored_digest_are_refused_with_both_digests(server, stored, tmp_path):
    raw, blob, info = stored
    server.blob = blob
    recorded = BlobInfo("sha256:" + "0" * 64, info.size, info.raw_digest, info.raw_size)
    with pytest.raises(CorruptDownloadError) as err:
        _download(server, tmp_path, recorded)
    assert str(err.value) == (
        f"downloaded {len(blob)} bytes with digest {info.digest}, "
        f"but the registry recorded {len(blob)} bytes with digest {recorded.digest}"
    )
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "recorded",
    [
        pytest.param(lambda i: BlobInfo(i.digest, i.size, i.raw_digest, i.raw_size - 1), id="raw size cap"),
        pytest.param(lambda i: BlobInfo(i.digest, i.size, "sha256:" + "1" * 64, i.raw_size), id="raw digest"),
    ],
)
def test_bytes_that_do_not_decompress_to_the_recorded_delta_are_refused(server, stored, tmp_path, recorded):
    raw, blob, info = stored
    server.blob = blob
    with pytest.raises(CorruptDownloadError):
        _download(server, tmp_path, recorded(info))
    assert _leftovers(tmp_path) == []


def test_bytes_after_the_frame_are_refused(server, stored, tmp_path):
    raw, blob, info = stored
    server.blob = blob + b"trailing"
    with pytest.raises(CorruptDownloadError):
        _download(server, tmp_path, info)
    assert _leftovers(tmp_path) == []


# --- the storage form ------------------------------------------------------------------------


def test_the_storage_form_is_the_bytes_compress_blob_writes_cut_into_parts(stored, tmp_path):
    raw, blob, info = stored
    (tmp_path / "raw").write_bytes(raw)
    form = StorageForm(tmp_path / "raw", part_size=100_000)
    parts = list(form.parts())
    assert b"".join(parts) == blob and form.info == info
    assert {len(p) for p in parts[:-1]} == {100_000} and 0 < len(parts[-1]) <= 100_000
    again = StorageForm(tmp_path / "raw", part_size=100_000)
    assert list(again.parts()) == parts  # deterministic: a resume recognises the parts already sent


def test_the_digests_are_known_only_once_every_part_was_read(tmp_path):
    (tmp_path / "raw").write_bytes(os.urandom(5000))
    form = StorageForm(tmp_path / "raw", part_size=1000)
    parts = form.parts()
    next(parts)
    with pytest.raises(RuntimeError, match="once every part was read"):
        form.info  # noqa: B018
    list(parts)
    assert form.info.raw_size == 5000


def test_a_file_that_changes_size_while_read_is_an_error(tmp_path):
    path = tmp_path / "raw"
    path.write_bytes(os.urandom(3 << 20))
    parts = StorageForm(path, part_size=1 << 20).parts()
    next(parts)
    with open(path, "r+b") as fh:
        fh.truncate(2 << 20)
    with pytest.raises(OSError, match="changed size while being pushed"):
        list(parts)


def test_an_empty_file_still_makes_one_part(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    form = StorageForm(tmp_path / "empty", part_size=1 << 20)
    (part,) = list(form.parts())
    assert form.info.size == len(part) > 0 and form.info.raw_size == 0


# --- part uploads ----------------------------------------------------------------------------


def _url(server: BlobServer):
    return lambda number: f"{server.url}/part/{number}?X-Amz-Signature=s"


def _slices(data: bytes, part_size: int) -> list[bytes]:
    return [data[i : i + part_size] for i in range(0, len(data), part_size)]


def test_each_part_gets_exactly_its_bytes(server):
    data = os.urandom(3 * (1 << 20) + 12345)
    moved, done = [], []
    with httpx.Client() as http:
        sent, skipped, etags = upload_parts(
            http,
            iter(_slices(data, 1 << 20)),
            url_for=_url(server),
            concurrency=3,
            advance=moved.append,
            on_part=done.append,
        )
    assert sorted(server.parts) == [1, 2, 3, 4] and b"".join(server.parts[n] for n in (1, 2, 3, 4)) == data
    assert (sent, skipped) == (len(data), 0) and sum(moved) == len(data) and sorted(done) == [1, 2, 3, 4]
    assert etags == {n: part_etag(part) for n, part in enumerate(_slices(data, 1 << 20), start=1)}


def test_parts_the_store_holds_are_not_sent(server):
    data = os.urandom(4000)
    held = {1: part_etag(data[:1000]), 3: part_etag(data[2000:3000])}
    asked: list[int] = []

    def url_for(number: int) -> str:
        asked.append(number)
        return _url(server)(number)

    with httpx.Client() as http:
        sent, skipped, etags = upload_parts(
            http,
            iter(_slices(data, 1000)),
            url_for=url_for,
            held=lambda number, part: held[number] if held.get(number) == part_etag(part) else None,
            concurrency=4,
        )
    assert server.parts == {2: data[1000:2000], 4: data[3000:]} and asked == [2, 4]
    assert (sent, skipped) == (2000, 2)
    assert etags == {n: part_etag(part) for n, part in enumerate(_slices(data, 1000), start=1)}


def test_a_refused_part_is_raised_with_the_store_and_its_message(server):
    server.refuse[2] = (
        403,
        b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
    )
    done = []
    with httpx.Client() as http, pytest.raises(NetworkError) as err:
        parts = iter(_slices(os.urandom(10_000), 1000))
        upload_parts(http, parts, url_for=_url(server), concurrency=1, on_part=done.append)
    host = server.url.removeprefix("http://")
    assert str(err.value) == f"the blob store at {host} refused part 2: HTTP 403 Request has expired"
    assert "X-Amz-Signature" not in str(err.value)  # the signature is never shown
    # The first failure stops the rest: no part is sent after it.
    assert done == [1] and set(server.arrived) == {1, 2}


def test_parts_are_made_while_others_are_sent_and_few_wait_in_memory(server):
    """The producer runs ahead of the uploads by at most concurrency + 1 parts, whatever the
    number of parts."""
    concurrency, ahead = 2, []
    done: list[int] = []
    for n in range(1, 13):
        server.delay[n] = 0.02

    def parts():
        for n in range(1, 13):
            ahead.append(n - len(done))
            yield bytes(1000)

    with httpx.Client() as http:
        upload_parts(http, parts(), url_for=_url(server), concurrency=concurrency, on_part=done.append)
    assert sorted(done) == list(range(1, 13))
    assert max(ahead) <= concurrency + 2 and max(ahead) >= 2  # bounded, and overlapped


def _peak_pushing(server: BlobServer, path: Path, part_size: int) -> int:
    tracemalloc.start()
    try:
        form = StorageForm(path, part_size=part_size)
        with httpx.Client() as http:
            upload_parts(http, form.parts(), url_for=_url(server), concurrency=2)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_file(server, tmp_path):
    server.keep = False
    part_size = 256 << 10
    peaks = {}
    for mib in (2, 48):
        path = tmp_path / f"{mib}.raw"
        path.write_bytes(os.urandom(mib << 20))
        peaks[mib] = _peak_pushing(server, path, part_size)
        assert sum(size for size, _ in server.parts.values()) > mib << 20  # every byte went
        server.parts.clear()
    # Parts in flight and fixed buffers (1 MiB file reads and zstd output, the test server's
    # threads), not the file: 24x the bytes, the same peak within those buffers' timing.
    assert peaks[48] < 8 << 20, peaks
    assert peaks[48] - peaks[2] < 2 << 20, peaks
