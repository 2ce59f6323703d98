"""registry.client.transfer: part uploads and downloads against a real blob server on 127.0.0.1:
every byte lands where it belongs, a cut download keeps its bytes and resumes with Range, and
bytes that are not the recorded blob are refused and leave nothing behind."""

from __future__ import annotations

import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from codec.storage import BlobInfo, compress_blob
from registry.client.errors import CorruptDownloadError, NetworkError, TransferInterruptedError
from registry.client.transfer import receive_blob, upload_parts


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
                    outer.parts[number] = body
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
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


# --- part uploads ----------------------------------------------------------------------------


def _parts(url: str, size: int, part_size: int) -> list[dict]:
    return [
        {
            "number": n + 1,
            "url": f"{url}/part/{n + 1}?X-Amz-Signature=s",
            "offset": off,
            "size": min(part_size, size - off),
        }
        for n, off in enumerate(range(0, size, part_size))
    ]


def test_each_part_gets_exactly_its_slice_of_the_file(server, tmp_path):
    data = os.urandom(3 * (1 << 20) + 12345)
    path = tmp_path / "staged.zst"
    path.write_bytes(data)
    parts = _parts(server.url, len(data), 1 << 20)
    moved, done = [], []
    with httpx.Client() as http:
        upload_parts(
            http, path, parts, concurrency=3, advance=moved.append, on_part=lambda p: done.append(p["number"])
        )
    assert sorted(server.parts) == [1, 2, 3, 4] and b"".join(server.parts[n] for n in (1, 2, 3, 4)) == data
    assert sum(moved) == len(data) and sorted(done) == [1, 2, 3, 4]


def test_only_the_parts_given_are_sent(server, tmp_path):
    data = os.urandom(4000)
    path = tmp_path / "staged.zst"
    path.write_bytes(data)
    missing = [p for p in _parts(server.url, len(data), 1000) if p["number"] in (2, 4)]
    with httpx.Client() as http:
        upload_parts(http, path, missing, concurrency=4)
        upload_parts(http, path, [], concurrency=4)  # nothing left to send: no request
    assert server.parts == {2: data[1000:2000], 4: data[3000:]}


def test_a_refused_part_is_raised_with_the_store_and_its_message(server, tmp_path):
    path = tmp_path / "staged.zst"
    path.write_bytes(os.urandom(10_000))
    server.refuse[2] = (
        403,
        b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
    )
    server.delay[3] = 0.3  # a part the failing worker may already have taken is still in flight
    done = []
    with httpx.Client() as http, pytest.raises(NetworkError) as err:
        upload_parts(
            http,
            path,
            _parts(server.url, 10_000, 1000),
            concurrency=1,
            on_part=lambda p: done.append(p["number"]),
        )
    host = server.url.removeprefix("http://")
    assert str(err.value) == f"the blob store at {host} refused part 2: HTTP 403 Request has expired"
    assert "X-Amz-Signature" not in str(err.value)  # the signature is never shown
    # The first failure stops the queue: no part starts after it.
    assert done == [1] and set(server.arrived) == {1, 2}


def test_a_file_shorter_than_its_parts_is_an_error_not_a_short_part(server, tmp_path):
    path = tmp_path / "staged.zst"
    path.write_bytes(os.urandom(1500))
    with httpx.Client() as http, pytest.raises(OSError, match="shorter than expected"):
        upload_parts(http, path, _parts(server.url, 2000, 1000), concurrency=1)
    assert 2 not in server.parts
