"""Hub model ids wherever a model directory is accepted: resolved through huggingface_hub's own
cache (filled from a hub on loopback that speaks the Hub's protocol), revisions by ref and by
commit, offline rules, and the errors for unknown ids and pickled-only repositories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app as cli_app
from codec.apply import apply_delta
from codec.checkpoint import Checkpoint
from codec.compress import CompressOptions, compress
from codec.errors import CheckpointError, HubUnavailableError, ModelNotFoundError
from codec.format import DeltaFile
from codec.hub import parse_hub_id, resolve_model
from tests.support.fake_hub import commit_of, hub, hub_repos  # noqa: F401  (fixtures)


def test_hub_id_grammar():
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("org/name@v2.1") == ("org/name", "v2.1")
    assert parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    assert parse_hub_id("./org/name") is None
    assert parse_hub_id("/abs/path") is None
    assert parse_hub_id("a/b/c") is None
    assert parse_hub_id("model.safetensors") is None


def test_compress_and_apply_from_hub_ids_equal_the_local_paths(hub, llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    local = compress(base_dir, ft_dir, tmp_path / "local.bdelta", CompressOptions(base_name="org/base"))
    remote = compress("org/base", "org/ft", tmp_path / "hub.bdelta", CompressOptions())
    assert remote.base_fingerprint == local.base_fingerprint
    delta = DeltaFile.open(tmp_path / "hub.bdelta")
    assert delta.base_model == "org/base"  # the repo id names the base when no --base-name is given
    assert json.loads(delta.metadata["x-base-source"]) == {
        "repo_id": "org/base",
        "revision": "main",
        "commit": commit_of("org/base", "main"),
    }
    assert json.loads(delta.metadata["x-finetuned-source"])["repo_id"] == "org/ft"
    local_delta = DeltaFile.open(tmp_path / "local.bdelta")
    assert set(delta.entries) == set(local_delta.entries)
    for name, entry in local_delta.entries.items():
        if entry.sign is not None:
            assert delta.sign(name).equal(local_delta.sign(name)), name
    # Only safetensors, config and tokenizer files were fetched: never the pickled weights.
    fetched = {p for _, p in hub.requests if "/resolve/" in p}
    assert fetched and not any(p.endswith(".bin") for p in fetched)

    out = apply_delta("org/base", tmp_path / "hub.bdelta", tmp_path / "rebuilt")
    ref = apply_delta(base_dir, tmp_path / "hub.bdelta", tmp_path / "rebuilt-local")
    a, b = Checkpoint.open(out.out_dir), Checkpoint.open(ref.out_dir)
    assert a.fingerprint() == b.fingerprint()
    card = (tmp_path / "rebuilt" / "README.md").read_text()
    assert card.startswith('---\nbase_model: "org/base"\n')
    assert commit_of("org/base", "main") in card and "sha256:" in card


def test_revisions_by_ref_and_by_commit(hub, hub_repos):
    main = Checkpoint.open("org/base")
    v2 = Checkpoint.open("org/base@v2")
    by_commit = Checkpoint.open(f"org/base@{commit_of('org/base', 'v2')}")
    by_option = Checkpoint.open("org/base", revision="v2")
    assert v2.fingerprint() == by_commit.fingerprint() == by_option.fingerprint()
    assert v2.fingerprint() == Checkpoint.open(hub_repos["org/base"]["v2"]).fingerprint()
    assert main.fingerprint() != v2.fingerprint()
    assert by_commit.source.commit == commit_of("org/base", "v2")
    with pytest.raises(ModelNotFoundError, match=r"org/base: no revision 'nope'"):
        Checkpoint.open("org/base@nope")
    with pytest.raises(CheckpointError, match="two revisions"):
        Checkpoint.open("org/base@v2", revision="main")


def test_a_local_path_wins_over_a_hub_id_of_the_same_spelling(hub, llama_pair, tmp_path):
    shutil.copytree(llama_pair[1], tmp_path / "org" / "base")
    ckpt = Checkpoint.open("org/base")
    assert ckpt.source is None and ckpt.root == Path("org/base")
    assert hub.requests == []


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "DELTACTL_OFFLINE"])
def test_offline_mode_reads_the_cache_and_never_the_network(hub, monkeypatch, variable):
    online = Checkpoint.open("org/base").fingerprint()
    seen = len(hub.requests)
    monkeypatch.setenv(variable, "1")
    if variable == "HF_HUB_OFFLINE":  # as huggingface_hub reads it when imported with it set
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert Checkpoint.open("org/base").fingerprint() == online
    assert len(hub.requests) == seen
    with pytest.raises(ModelNotFoundError) as err:
        Checkpoint.open("org/ft")
    assert "org/ft@main: not in the Hub cache at" in str(err.value) and str(hub.cache) in str(err.value)
    assert len(hub.requests) == seen


def test_hub_unreachable_and_not_cached_names_the_cache(hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(HubUnavailableError, match=r"org/base@main: cannot reach http://127\.0\.0\.1:9"):
        Checkpoint.open("org/base")


def test_unknown_id_and_pickled_only_repositories(hub):
    with pytest.raises(ModelNotFoundError, match=r"org/nope: no such model on http://127\.0\.0\.1"):
        Checkpoint.open("org/nope")
    with pytest.raises(
        CheckpointError, match=r"org/pickled@main: has only pickled PyTorch weights \(pytorch_model.bin\)"
    ):
        Checkpoint.open("org/pickled")
    with pytest.raises(CheckpointError, match="a revision applies to a Hub model id"):
        resolve_model(".", revision="main")


def test_cli_exit_codes_for_hub_ids(hub, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli_app, ["compress", "org/nope", "org/ft", "-o", str(tmp_path / "x.bdelta")])
    assert missing.exit_code == 3, missing.output
    assert "error: model not found: org/nope: no such model" in missing.output
    ok = runner.invoke(cli_app, ["compress", "org/base", "org/ft", "-o", str(tmp_path / "x.bdelta")])
    assert ok.exit_code == 0, ok.output
    shown = runner.invoke(cli_app, ["inspect", str(tmp_path / "x.bdelta")])
    assert "x-base-source" in shown.output and commit_of("org/base", "main") in shown.output
    rebuilt = runner.invoke(
        cli_app, ["apply", "org/base@main", str(tmp_path / "x.bdelta"), "-o", str(tmp_path / "out")]
    )
    assert rebuilt.exit_code == 0, rebuilt.output
    assert (tmp_path / "out" / "README.md").is_file()
