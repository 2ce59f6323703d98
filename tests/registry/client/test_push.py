"""registry.client.push: what a resumed push reports is what happened, against a registry stand-in
on 127.0.0.1 that answers by path (the states a real registry reaches after an interrupted push)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from codec.compress import CompressOptions, compress
from codec.format import DeltaFile
from registry.client import RegistryApi


@pytest.fixture(scope="module")
def delta(llama_pair, tmp_path_factory):
    path = tmp_path_factory.mktemp("push") / "d.bdelta"
    compress(*llama_pair, path, CompressOptions(base_name="org/tiny"))
    return path


def _registry(routes: dict):
    """A server answering `METHOD path` with routes[...] = (status, body); records the calls."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            key = f"{self.command} {self.path.split('?')[0]}"
            calls.append(key)
            status, body = routes.get(key, (404, {"error": {"code": "not_found", "message": key}}))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, calls


def _version(number: int) -> dict:
    return {
        "repository": "acme/math",
        "number": number,
        "digest": "sha256:" + "1" * 64,
        "size": 10,
        "raw_digest": "sha256:" + "2" * 64,
        "raw_size": 20,
        "tags": ["latest"],
    }


@pytest.mark.parametrize(("status", "earlier"), [(201, False), (200, True)])
def test_a_resumed_push_says_who_published_the_saved_upload(delta, tmp_path, status, earlier):
    with DeltaFile.open(delta) as d:
        fingerprint = d.base_fingerprint
    repo = {
        "full_name": "acme/math",
        "namespace": "acme",
        "name": "math",
        "base": "org/tiny",
        "base_fingerprint": fingerprint,
    }
    server, calls = _registry(
        {
            "GET /v1/repos/acme/math": (200, repo),
            # the saved upload cannot take bytes any more (its parts were assembled) ...
            "GET /v1/uploads/u-1": (
                409,
                {"error": {"code": "conflict", "message": "can no longer take parts"}},
            ),
            # ... and completing it publishes it now (201) or names what an earlier run published (200)
            "POST /v1/uploads/u-1/complete": (status, _version(4)),
        }
    )
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with RegistryApi(url, home=tmp_path / "home") as api:
            with api.cache.push_state(delta) as state:
                # what the interrupted run saved
                state.remember_upload(f"{api.endpoint} acme/math", "u-1", None)
            result = api.push(delta, "acme/math")
    finally:
        server.shutdown()
        server.server_close()
    assert result.version.number == 4 and result.sent_bytes == 0 and result.resumed
    assert result.already_published is earlier and result.completed_earlier_upload is not earlier
    assert calls == ["GET /v1/repos/acme/math", "GET /v1/uploads/u-1", "POST /v1/uploads/u-1/complete"]
