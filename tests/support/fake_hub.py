"""A model hub on loopback that speaks the part of the Hugging Face Hub's HTTP protocol that
`huggingface_hub.snapshot_download` uses (repo info, file tree, HEAD/GET of `resolve/`), serving
repositories laid out as local folders, so the Hub code paths run for real without the internet.

    with FakeHub({"org/base": {"main": "path/to/dir"}}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url

The `hub` fixture serves the tiny Llama pair as org/base (main, and a v2 branch holding other
weights), org/ft and org/pickled (only a .bin), with HF_HUB_CACHE in the test's tmp dir.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tests.support.model_pairs import make_llama_pair


def commit_of(repo_id: str, ref: str) -> str:
    """A stable 40-hex commit id for a repository's ref."""
    return hashlib.sha1(f"{repo_id}@{ref}".encode()).hexdigest()


class FakeHub:
    """repos: repo id -> {ref name: folder}; each ref's folder is one commit of the repository."""

    def __init__(self, repos: dict[str, dict[str, str | Path]]):
        self.repos = {rid: {ref: Path(folder) for ref, folder in refs.items()} for rid, refs in repos.items()}
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _folder(self, repo_id: str, revision: str) -> tuple[str, Path] | None:
        refs = self.repos.get(repo_id)
        if refs is None:
            return None
        for ref, folder in refs.items():
            if revision in (ref, commit_of(repo_id, ref)):
                return commit_of(repo_id, ref), folder
        return None

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, *, head=False):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header(
                    "Content-Length",
                    str(len(body))
                    if not head or status >= 400
                    else (headers or {}).get("X-Size", str(len(body))),
                )
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _not_found(self, code: str, head=False):
                self._send(
                    404,
                    json.dumps({"error": code}).encode(),
                    {"X-Error-Code": code, "X-Error-Message": code, "Content-Type": "application/json"},
                    head=head,
                )

            def _route(self, head: bool):
                path = unquote(urlsplit(self.path).path)
                hub.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                    repo_id, kind, revision = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
                    if repo_id not in hub.repos:
                        return self._not_found("RepoNotFound", head)
                    found = hub._folder(repo_id, revision)
                    if found is None:
                        return self._not_found("RevisionNotFound", head)
                    commit, folder = found
                    files = sorted(p for p in folder.rglob("*") if p.is_file())
                    if kind == "revision":
                        body = {
                            "id": repo_id,
                            "modelId": repo_id,
                            "sha": commit,
                            "private": False,
                            "siblings": [{"rfilename": p.relative_to(folder).as_posix()} for p in files],
                        }
                    else:
                        body = [
                            {
                                "type": "file",
                                "path": p.relative_to(folder).as_posix(),
                                "size": p.stat().st_size,
                                "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
                            }
                            for p in files
                        ]
                    return self._send(
                        200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head=head
                    )
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, revision, name = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
                    if repo_id not in hub.repos:
                        return self._not_found("RepoNotFound", head)
                    found = hub._folder(repo_id, revision)
                    if found is None:
                        return self._not_found("RevisionNotFound", head)
                    commit, folder = found
                    file = folder / name
                    if not file.is_file():
                        return self._not_found("EntryNotFound", head)
                    data = file.read_bytes()
                    etag = hashlib.sha256(data).hexdigest()
                    return self._send(
                        200,
                        data,
                        {
                            "X-Repo-Commit": commit,
                            "ETag": f'"{etag}"',
                            "Content-Type": "application/octet-stream",
                        },
                        head=head,
                    )
                return self._not_found("NotFound", head)

            def do_GET(self):
                self._route(head=False)

            def do_HEAD(self):
                self._route(head=True)

        return Handler


# --- fixtures: a hub holding the tiny Llama pair, and the environment pointed at it -------------


@pytest.fixture(scope="session")
def hub_repos(tmp_path_factory, llama_pair):
    """Folders for the hub: org/base (main, and a v2 branch with other weights), org/ft, org/pickled."""
    root = tmp_path_factory.mktemp("hub_repos")
    base, ft = (shutil.copytree(d, root / d.name) for d in llama_pair)  # never write into the shared pair
    other_base, _ = make_llama_pair(root / "other", seed=7)
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    for folder in (base, other_base):
        (folder / "pytorch_model.bin").write_bytes(b"never fetched")  # beside the safetensors
    return {
        "org/base": {"main": base, "v2": other_base},
        "org/ft": {"main": ft},
        "org/pickled": {"main": pickled},
    }


@pytest.fixture
def hub(hub_repos, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for var in ("HF_HUB_OFFLINE", "DELTACTL_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    # The suite runs with HF_HUB_OFFLINE=1 (tests/conftest.py), which huggingface_hub read at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)  # no local folder named org/... unless a test makes one
    with FakeHub(hub_repos) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.cache = cache
        yield server
