"""The commands a repository page offers to copy work as written: its `deltactl pull` line pulls
the pushed delta, and its Python lines serve it next to the base (a real tiny Llama, CPU)."""

from __future__ import annotations

import html
import re
import shlex

import torch
from typer.testing import CliRunner

from cli.main import app as deltactl_app
from tests.registry.helpers import push, setup_repo

from .conftest import BROWSER


def copy_blocks(page: str) -> list[str]:
    return [html.unescape(b) for b in re.findall(r"<pre data-copy><code>(.*?)</code></pre>", page, re.S)]


def test_pull_command_and_python_snippet_of_a_repository_page_work(
    live_server, delta_blobs, llama_pair, tmp_path, monkeypatch
):
    monkeypatch.setenv("DELTACTL_HOME", str(tmp_path / "home"))
    server = live_server()
    blob = delta_blobs[0]
    with server.client() as client:
        setup_repo(client, blob.base_fingerprint)
        assert push(client, blob).status_code == 201
        page = client.get("/acme/math", headers=BROWSER).text
    pull_line, snippet = copy_blocks(page)

    args = shlex.split(pull_line)
    assert args[:2] == ["deltactl", "pull"] and server.url in args
    pulled = CliRunner().invoke(deltactl_app, args[1:])
    assert pulled.exit_code == 0, pulled.output

    base_dir, _ = llama_pair
    assert '"./base"' in snippet
    scope = {"input_ids": torch.tensor([[1, 5, 9, 2]])}
    exec(snippet.replace('"./base"', repr(str(base_dir))), scope)  # noqa: S102 - the page's own lines
    dm, logits = scope["dm"], scope["logits"]
    assert logits.shape[:2] == (1, 4)
    expected = dm(scope["input_ids"], delta_ids=[dm.load(str(blob.raw_path))])  # the pushed file itself
    assert torch.equal(logits, expected)
    assert not torch.equal(logits, dm(scope["input_ids"], delta_ids=[-1]))  # the delta changed the output
