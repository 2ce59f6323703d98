"""Processes the reliability tests and benchmarks drive: the registry under uvicorn in its own
process (so it can be SIGKILLed), a private PostgreSQL cluster (so it can be restarted), and the
push protocol spoken with plain httpx (no client library).

    with RegistryProcess(env) as server:            # uvicorn --factory registry.app:create_app
        r = http_push(server.client(), "acme/math", storage_form(delta_bytes(1)))
        server.kill()                                # SIGKILL, then server.start() again
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.support.corpus import BASE_NAME, FINGERPRINT, StoredDelta

ROOT = Path(__file__).resolve().parents[2]
PG_BIN = Path(os.environ.get("DELTASTORE_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def migrate(env: dict[str, str]) -> None:
    """Bring the database named by a DELTASTORE_* environment to the schema head."""
    from tests.support.live_registry import migrate as migrate_url

    migrate_url(settings_from_env(env).resolved_database_url)


def settings_from_env(env: dict[str, str]):
    from registry.server.settings import Settings

    return Settings(
        **{k.removeprefix("DELTASTORE_").lower(): v for k, v in env.items() if k.startswith("DELTASTORE_")}
    )


class RegistryProcess:
    """The registry app under uvicorn in a child process on a fixed loopback port; its output
    goes to `log_path` (scanned for secrets by the security tests)."""

    def __init__(self, env: dict[str, str], *, log_path: Path | None = None, port: int | None = None):
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        self.port = port or free_port()
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="registry-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> RegistryProcess:
        args = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "registry.server.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "info",
        ]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"registry exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout, "the registry to start")
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)

    def __enter__(self) -> RegistryProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- a proxy that loses answers --------------------------------------------------------------
class AnswerLosingProxy:
    """A TCP proxy on loopback in front of `upstream_port` that passes every byte through, except
    that for the first `drops` requests whose first bytes match `pattern` it lets the request
    reach the server, waits until the server's answer starts (so the server has done the work),
    then closes the client's connection without passing the answer on: a lost response.

        with AnswerLosingProxy(server.port, rb"^POST /v1/uploads/\\w+/complete ", drops=1) as proxy:
            RegistryApi(proxy.url).push(...)          # sees its first `complete` answer lost
    """

    def __init__(self, upstream_port: int, pattern: bytes, *, drops: int = 1):
        import re

        self.upstream_port = upstream_port
        self.pattern = re.compile(pattern)
        self.drops = drops
        self.dropped = 0  # answers lost so far
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> AnswerLosingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def __enter__(self) -> AnswerLosingProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            lose = threading.Event()
            threading.Thread(target=self._requests, args=(client, upstream, lose), daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client, lose), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, lose: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(1 << 16):
                if self.pattern.match(data):
                    with self._lock:
                        if self.drops > 0:
                            self.drops -= 1
                            lose.set()  # before the request goes on, so its answer cannot slip through
                upstream.sendall(data)
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)

    def _answers(self, upstream: socket.socket, client: socket.socket, lose: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(1 << 16):
                if lose.is_set():
                    with self._lock:
                        self.dropped += 1
                    break
                client.sendall(data)
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


# --- an HTTP server in front of the registry ------------------------------------------------
class FrontServer:
    """A tiny HTTP/1.1 server on loopback standing where a proxy or load balancer would: each
    request is answered by the first scripted answer whose method and path match (each answers
    `times` requests, then is used up), else passed on to the registry at `upstream`, else 404.
    It records every request it receives as (method, path with query).

        with FrontServer(upstream=server.url) as front:
            front.answer("GET", r"/v1/repos", 503, b"<html>busy</html>", {"Retry-After": "1"})
            RegistryApi(front.url).repos()             # the 503, then the registry's answer
            front.requests                             # [("GET", "/v1/repos?limit=200"), ...]
    """

    def __init__(self, upstream: str | None = None):
        import http.server

        self.upstream = upstream
        self.requests: list[tuple[str, str]] = []
        self._scripts: list[dict] = []
        self._lock = threading.Lock()
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, headers, content = front._respond(self.command, self.path, dict(self.headers), body)
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer(
        self,
        method: str,
        path: str,
        status: int,
        body: bytes = b"",
        headers: dict | None = None,
        *,
        times: int = 1,
        content_type: str = "text/html",
    ) -> None:
        """Answer the next `times` requests of `method` whose path (query left out) fully matches
        the regular expression `path` with `status`, `body` and `headers`."""
        import re

        with self._lock:
            self._scripts.append(
                {
                    "method": method,
                    "path": re.compile(path),
                    "times": times,
                    "status": status,
                    "headers": [("Content-Type", content_type), *(headers or {}).items()],
                    "body": body,
                }
            )

    def reset(self) -> None:
        """Forget the scripted answers and the recorded requests."""
        with self._lock:
            self._scripts.clear()
            self.requests.clear()

    def count(self, method: str, path: str) -> int:
        """How many requests of `method` to `path` (query left out) arrived."""
        return sum(1 for m, p in self.requests if m == method and p.split("?", 1)[0] == path)

    def _respond(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, list, bytes]:
        with self._lock:
            self.requests.append((method, path))
            for script in self._scripts:
                if (
                    script["times"]
                    and script["method"] == method
                    and script["path"].fullmatch(path.split("?", 1)[0])
                ):
                    script["times"] -= 1
                    return script["status"], script["headers"], script["body"]
        if self.upstream is None:
            return 404, [("Content-Type", "text/plain")], b"nothing here"
        skip = {"host", "content-length", "connection", "transfer-encoding", "accept-encoding"}
        r = httpx.request(
            method,
            self.upstream + path,
            content=body,
            timeout=60,
            headers={k: v for k, v in headers.items() if k.lower() not in skip},
        )
        hop = {"content-length", "connection", "transfer-encoding", "content-encoding", "keep-alive"}
        return r.status_code, [(k, v) for k, v in r.headers.multi_items() if k.lower() not in hop], r.content

    def __enter__(self) -> FrontServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- a private PostgreSQL cluster ------------------------------------------------------------
def postgres_available() -> str | None:
    """None when a private cluster can be started here, else why not."""
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL binaries not found in {PG_BIN}"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a postgres user"
    return None


class PostgresCluster:
    """A throwaway PostgreSQL cluster on a free loopback port that a test may stop and restart."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ds-pg-"))
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.dir, "postgres")

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["runuser", "-u", "postgres", "--", *args] if self._as_postgres else list(args)
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    database = "postgres"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}"

    def create_database(self) -> str:
        import uuid

        import psycopg

        name = f"ds_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def for_database(self, name: str) -> PostgresCluster:
        """The same cluster, with `url` naming database `name`."""
        view = copy.copy(self)
        view.database = name
        return view

    def running(self) -> bool:
        return (
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "status", check=False).returncode
            == 0
        )

    def start_if_stopped(self) -> None:
        if not self.running():
            self.start()

    def init(self) -> PostgresCluster:
        self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.dir / "data"),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        )
        return self.start()

    def start(self) -> PostgresCluster:
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k "
            f"{self.dir} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.dir / "data"),
            "-l",
            str(self.dir / "log"),
            "-w",
            "-o",
            opts,
            "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-m", mode, "-w", "stop", check=False)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster().init()
    try:
        yield cluster
    finally:
        cluster.destroy()


# --- the push protocol over plain HTTP -------------------------------------------------------
def setup_repo(
    client: httpx.Client,
    repo: str,
    *,
    headers: dict | None = None,
    base: str = BASE_NAME,
    fingerprint: str = FINGERPRINT,
    **extra,
) -> None:
    r = client.post("/v1/bases", json={"name": base, "fingerprint": fingerprint}, headers=headers)
    assert r.status_code in (200, 201), r.text
    ns, name = repo.split("/")
    r = client.post("/v1/repos", json={"namespace": ns, "name": name, "base": base, **extra}, headers=headers)
    assert r.status_code in (201, 409), r.text


def streamed_upload(client: httpx.Client, raw_size: int, part_size: int, repo: str = "acme/math") -> dict:
    """A multipart upload declared with its raw size alone (as a streamed push declares it)."""
    r = client.post(f"/v1/repos/{repo}/uploads", json={"raw_size": raw_size})
    assert r.status_code == 201, r.text
    assert r.json()["method"] == "s3-multipart" and r.json()["part_size"] == part_size, r.text
    return r.json()


def part_targets(client: httpx.Client, upload: dict, size: int, *, headers: dict | None = None) -> list:
    """(url, offset, size) of each part of an `s3-multipart` upload of `size` stored bytes, the URLs
    asked for in batches as a client does."""
    part_size = upload["part_size"]
    count = max(1, -(-size // part_size))
    urls: list[str] = []
    while len(urls) < count:
        r = client.get(
            upload["parts_url"],
            params={"first": len(urls) + 1, "count": min(100, count - len(urls))},
            headers=headers,
        )
        assert r.status_code == 200, r.text
        urls += [p["url"] for p in r.json()["parts"]]
    return [(url, i * part_size, min(part_size, size - i * part_size)) for i, url in enumerate(urls)]


def send_bytes(
    client: httpx.Client, upload: dict, data: bytes, *, headers: dict | None = None
) -> httpx.Response | None:
    """Send an upload's bytes where the registry said; returns the failing response, if any."""
    method = upload["method"]
    if method == "exists":
        return None
    if method == "stream":
        r = client.put(upload["upload_url"], content=data, headers=headers)
        return None if r.status_code == 200 else r
    targets = (
        [(upload["upload_url"], 0, len(data))]
        if method == "s3-put"
        else part_targets(client, upload, len(data), headers=headers)
    )
    with httpx.Client(timeout=60) as s3:
        for url, offset, size in targets:
            r = s3.put(url, content=data[offset : offset + size])
            if r.status_code != 200:
                return r
    return None


def http_push(
    client: httpx.Client, repo: str, blob: StoredDelta, *, headers: dict | None = None
) -> httpx.Response:
    """The whole two-phase push, declared with the blob's digests (as a client that knows them
    does); returns the response of `complete` or of the step that failed."""
    r = client.post(f"/v1/repos/{repo}/uploads", json=blob.declaration(), headers=headers)
    if r.status_code != 201:
        return r
    upload = r.json()
    failed = send_bytes(client, upload, blob.data, headers=headers)
    if failed is not None:
        return failed
    return client.post(upload["complete_url"], headers=headers)


def streamed_http_push(
    client: httpx.Client, repo: str, blob: StoredDelta, *, headers: dict | None = None
) -> httpx.Response:
    """The streamed push: declared with the raw size alone, the digests named at `complete`."""
    r = client.post(f"/v1/repos/{repo}/uploads", json={"raw_size": blob.raw_size}, headers=headers)
    if r.status_code != 201:
        return r
    upload = r.json()
    failed = send_bytes(client, upload, blob.data, headers=headers)
    if failed is not None:
        return failed
    return client.post(upload["complete_url"], json=blob.declaration(), headers=headers)
