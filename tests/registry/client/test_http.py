"""registry.client.http: the one retry policy and the one response-to-exception translation,
against a real HTTP server on 127.0.0.1 that answers from a script."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from registry.client.errors import RegistryUnavailableError
from registry.client.http import RegistryHttp
from registry.client.transfer import put_bytes
from registry.common.errors import DatabaseUnavailableError, NotFoundError


class Scripted:
    """A server answering each request with the next (status, headers, body) of `script`
    (the last one repeats); None drops the connection without an answer."""

    def __init__(self, script):
        self.script, self.seen = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.seen.append((self.command, self.path, len(body)))
                step = outer.script[min(len(outer.seen), len(outer.script)) - 1]
                if step is None:
                    self.close_connection = True
                    self.connection.close()
                    return
                status, headers, payload = step
                data = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted():
    servers = []

    def start(*script):
        servers.append(Scripted(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _http(url, max_wait=10.0):
    return RegistryHttp(url, None, upload_concurrency=2, unavailable_max_wait=max_wait)


OK = (200, {}, {"ok": True})
DB_DOWN = (
    503,
    {"Retry-After": "0"},
    {"error": {"code": "database_unavailable", "message": "database is restarting"}},
)


def test_a_get_waits_out_503s_with_retry_after_within_the_attempts(scripted):
    server = scripted(DB_DOWN, DB_DOWN, OK)
    assert _http(server.url).request("GET", "/v1/repos").json() == {"ok": True}
    assert [method for method, _, _ in server.seen] == ["GET"] * 3


def test_a_post_is_never_sent_again_after_a_503(scripted):
    server = scripted(DB_DOWN, OK)
    with pytest.raises(DatabaseUnavailableError, match="cannot use its database right now"):
        _http(server.url).request("POST", "/v1/repos", json={})
    assert len(server.seen) == 1


def test_a_retry_after_beyond_the_budget_fails_at_once(scripted):
    server = scripted((503, {"Retry-After": "30"}, None), OK)
    with pytest.raises(RegistryUnavailableError, match="without the registry's error body .* retry in 30 s"):
        _http(server.url, max_wait=10).request("GET", "/v1/repos")
    assert len(server.seen) == 1


def test_the_error_body_comes_back_as_its_class(scripted):
    server = scripted(
        (404, {}, {"error": {"code": "not_found", "message": "repository acme/x does not exist"}})
    )
    with pytest.raises(NotFoundError, match="^repository acme/x does not exist$"):
        _http(server.url).request("GET", "/v1/repos/acme/x")


def test_a_lost_answer_of_a_repeatable_post_is_asked_for_once_more(scripted):
    server = scripted(None, OK)
    answer, repeated = _http(server.url).post_once_more_if_lost("/v1/uploads/u/complete")
    assert answer.json() == {"ok": True} and repeated
    assert [method for method, _, _ in server.seen] == ["POST", "POST"]


def test_put_bytes_retries_transient_answers_and_takes_back_their_progress(scripted):
    data = (bytes(range(256)) * 40)[100:5100]
    server = scripted((500, {}, None), (503, {}, None), OK)
    moved = []
    http = _http(server.url)
    response = put_bytes(http.blobs, server.url + "/part", data, advance=moved.append, attempts=3)
    assert response.status_code == 200 and [size for _, _, size in server.seen] == [5000] * 3
    assert sum(moved) == 5000  # two failed attempts taken back


def test_put_bytes_returns_the_last_answer_when_attempts_run_out(scripted):
    server = scripted((500, {}, None))
    response = put_bytes(_http(server.url).blobs, server.url + "/part", b"x" * 10, attempts=2)
    assert response.status_code == 500 and len(server.seen) == 2
