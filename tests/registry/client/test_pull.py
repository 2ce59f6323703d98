"""registry.client.pull's download against real HTTP servers on 127.0.0.1: a registry that
redirects to a presigned URL and a blob store behind it (urllib3's GET): every byte lands, the
token never reaches the store, the connection is reused, a cut is resumed with Range within the
attempts (or kept for the next pull), a store that ignores Range or refuses, a 503 with
Retry-After, corrupt bytes, and the proxy the environment names."""

from __future__ import annotations

import http.client
import os
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from codec.storage import compress_blob
from registry.client import settings
from registry.client.cache import DeltaCache
from registry.client.errors import CorruptDownloadError, TransferInterruptedError
from registry.client.http import RegistryHttp
from registry.client.pull import download
from registry.client.types import Silent, VersionInfo
from registry.common.errors import BlobStoreError

PRESIGNED = "/bucket/blobs/abc?X-Amz-Signature=0123"


def _serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


class Store:
    """A blob store: GET of the presigned path serves `blob` (honouring `Range: bytes=N-` unless
    `ignore_range`), cut after `cut_after` body bytes for the next `cuts` answers; `script`
    holds (status, headers, body) answers given first, in order. Records each request's headers
    and the connections it was made on."""

    def __init__(self, blob: bytes):
        self.blob = blob
        self.cut_after, self.cuts = 0, 0
        self.ignore_range = False
        self.script: list[tuple[int, dict, bytes]] = []
        self.requests: list[dict] = []
        self.connections: set[int] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                outer.requests.append({**self.headers, "path": self.path})
                outer.connections.add(id(self.connection))
                if outer.script:
                    status, headers, body = outer.script.pop(0)
                    self.send_response(status)
                    for key, value in {**headers, "Content-Length": str(len(body))}.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body)
                    return
                assert self.path == PRESIGNED, self.path
                wanted = self.headers.get("Range")
                start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1)) if wanted else 0
                if outer.ignore_range:
                    start = 0
                body = outer.blob[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cuts:
                    outer.cuts -= 1
                    self.wfile.write(body[: outer.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = _serve(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


class Registry:
    """A registry whose download endpoint redirects (307) to the store's presigned URL."""

    def __init__(self, store: Store):
        outer = self
        self.requests: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                outer.requests.append({**self.headers, "path": self.path})
                self.send_response(307)
                self.send_header("Location", store.url + PRESIGNED)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = _serve(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


class ForwardProxy:
    """An HTTP forward proxy: passes each absolute-URI GET on and streams the answer back,
    recording the URLs it was asked for."""

    def __init__(self):
        outer = self
        self.urls: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                outer.urls.append(self.path)
                target = urllib.parse.urlsplit(self.path)
                upstream = http.client.HTTPConnection(target.hostname, target.port)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection",)}
                upstream.request(
                    "GET", target.path + (f"?{target.query}" if target.query else ""), headers=headers
                )
                answer = upstream.getresponse()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("connection", "keep-alive", "transfer-encoding"):
                        self.send_header(key, value)
                self.end_headers()
                while buf := answer.read(1 << 16):
                    self.wfile.write(buf)
                upstream.close()

            def log_message(self, *args):
                pass

        self.server = _serve(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A delta-like file (3 MiB: several 1 MiB reads) and its storage form."""
    folder = tmp_path_factory.mktemp("blob")
    raw = os.urandom(2 << 20) + bytes(1 << 20)
    (folder / "raw").write_bytes(raw)
    info = compress_blob(folder / "raw", folder / "raw.zst")
    return raw, (folder / "raw.zst").read_bytes(), info


@pytest.fixture
def servers(stored):
    store = Store(stored[1])
    registry = Registry(store)
    yield registry, store
    for server in (registry.server, store.server):
        server.shutdown()
        server.server_close()


def _version(info) -> VersionInfo:
    return VersionInfo(
        repository="acme/math",
        number=1,
        digest=info.digest,
        size=info.size,
        raw_digest=info.raw_digest,
        raw_size=info.raw_size,
        download_url="/v1/repos/acme/math/versions/1/download",
    )


def _download(http: RegistryHttp, cache: DeltaCache, info) -> int:
    with cache.blob_lock(info.raw_digest):  # as `pull` calls it (the lock makes the folder)
        return download(http, cache, _version(info), Silent())


def _pull(registry: Registry, home: Path, info) -> tuple[Path, int]:
    cache = DeltaCache(home)
    http = RegistryHttp(registry.url, "secret-token", upload_concurrency=2, unavailable_max_wait=5)
    try:
        moved = _download(http, cache, info)
    finally:
        http.close()
    return cache.blob_path(info.raw_digest), moved


def _left(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "blobs").iterdir() if not p.name.endswith(".lock"))


def test_a_redirected_download_lands_bit_exact_without_the_token_on_one_connection(servers, stored, tmp_path):
    registry, store = servers
    raw, blob, info = stored
    cache = DeltaCache(tmp_path / "home")
    http = RegistryHttp(registry.url, "secret-token", upload_concurrency=2, unavailable_max_wait=5)
    try:
        assert _download(http, cache, info) == len(blob)
        first = cache.blob_path(info.raw_digest)
        assert first.read_bytes() == raw and _left(tmp_path / "home") == [first.name]
        first.unlink()
        assert _download(http, cache, info) == len(blob)  # again, on the kept connection
        assert first.read_bytes() == raw
    finally:
        http.close()
    assert registry.requests[0]["Authorization"] == "Bearer secret-token"
    assert [r["path"] for r in store.requests] == [PRESIGNED, PRESIGNED]
    assert not any("Authorization" in r for r in store.requests)  # the token is the registry's alone
    assert all(r["User-Agent"].startswith("deltactl/") for r in store.requests)
    assert len(store.connections) == 1  # the body was read to its end: the connection went back to the pool


def test_a_cut_download_is_resumed_with_range_within_the_attempts(servers, stored, tmp_path):
    registry, store = servers
    raw, blob, info = stored
    store.cut_after, store.cuts = len(blob) // 3, 2
    path, moved = _pull(registry, tmp_path / "home", info)
    assert path.read_bytes() == raw and moved == len(blob)  # every byte came over the network once
    kept = len(blob) // 3
    assert [r.get("Range") for r in store.requests] == [None, f"bytes={kept}-", f"bytes={2 * kept}-"]
    assert _left(tmp_path / "home") == [path.name]


def test_a_cut_after_the_last_attempt_keeps_the_partial_for_the_next_pull(
    servers, stored, tmp_path, monkeypatch
):
    registry, store = servers
    raw, blob, info = stored
    monkeypatch.setattr(settings, "TRANSFER_ATTEMPTS", 1)
    store.cut_after, store.cuts = 1_500_000, 1
    with pytest.raises(TransferInterruptedError) as err:
        _pull(registry, tmp_path / "home", info)
    assert re.fullmatch(
        rf"download stopped after 1500000 of {len(blob)} bytes \(connection lost: Connection broken: "
        r"IncompleteRead\(1500000 bytes read, \d+ more expected\)\); pull again to resume",
        str(err.value),
    ), str(err.value)
    [partial] = _left(tmp_path / "home")
    assert partial.endswith(".zst.incomplete")
    assert (tmp_path / "home" / "blobs" / partial).read_bytes() == blob[:1_500_000]

    path, moved = _pull(registry, tmp_path / "home", info)
    assert store.requests[-1]["Range"] == "bytes=1500000-" and moved == len(blob) - 1_500_000
    assert path.read_bytes() == raw and _left(tmp_path / "home") == [path.name]


def test_a_store_that_ignores_range_sends_everything_again_and_the_result_is_exact(servers, stored, tmp_path):
    registry, store = servers
    raw, blob, info = stored
    store.cut_after, store.cuts, store.ignore_range = 1_000_000, 1, True
    path, moved = _pull(registry, tmp_path / "home", info)
    assert [r.get("Range") for r in store.requests] == [None, "bytes=1000000-"]
    assert path.read_bytes() == raw and moved == 1_000_000 + len(blob)


def test_a_refusing_store_is_a_blob_store_error_and_leaves_nothing(servers, stored, tmp_path):
    registry, store = servers
    store.script = [(403, {"Content-Type": "application/xml"}, b"<Error><Code>AccessDenied</Code></Error>")]
    with pytest.raises(BlobStoreError) as err:
        _pull(registry, tmp_path / "home", stored[2])
    assert str(err.value) == "the blob store answered HTTP 403 to the download"
    assert _left(tmp_path / "home") == [] and len(store.requests) == 1


def test_a_content_encoded_answer_is_refused_before_anything_is_kept(servers, stored, tmp_path):
    registry, store = servers
    store.script = [(200, {"Content-Encoding": "gzip"}, b"\x1f\x8b not the stored bytes")]
    with pytest.raises(BlobStoreError) as err:
        _pull(registry, tmp_path / "home", stored[2])
    assert str(err.value) == (
        "the blob store sent the download with Content-Encoding 'gzip'; the registry stores blobs without one"
    )
    assert _left(tmp_path / "home") == []


def test_a_503_with_retry_after_from_the_store_is_waited_out(servers, stored, tmp_path):
    registry, store = servers
    raw, _, info = stored
    store.script = [(503, {"Retry-After": "1"}, b"<Error><Code>SlowDown</Code></Error>")]
    started = time.monotonic()
    path, _ = _pull(registry, tmp_path / "home", info)
    assert time.monotonic() - started >= 1.0 and len(store.requests) == 2
    assert path.read_bytes() == raw


def test_corrupt_bytes_from_the_store_are_refused_and_leave_nothing(servers, stored, tmp_path):
    registry, store = servers
    raw, blob, info = stored
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x01
    store.blob = bytes(flipped)
    with pytest.raises(CorruptDownloadError):
        _pull(registry, tmp_path / "home", info)
    assert _left(tmp_path / "home") == []


def test_the_store_is_reached_through_the_proxy_the_environment_names(servers, stored, tmp_path, monkeypatch):
    registry, store = servers
    raw, _, info = stored
    proxy = ForwardProxy()
    try:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        path, _ = _pull(registry, tmp_path / "home", info)
        assert path.read_bytes() == raw
        assert store.url + PRESIGNED in proxy.urls

        monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # bypassed: straight to the store
        path.unlink()
        proxy.urls.clear()
        path, _ = _pull(registry, tmp_path / "home", info)
        assert path.read_bytes() == raw and store.url + PRESIGNED not in proxy.urls
    finally:
        proxy.server.shutdown()
        proxy.server.server_close()
