"""`deltactl login / push / pull / list / show / tag / rm / base / cache` against the real registry
(uvicorn on loopback, SQLite, local blob store), through CliRunner with an isolated DELTACTL_HOME."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import threading

import pytest

from cli import errors as exit_codes
from codec.format import DeltaFile
from registry.client import pull as pulling
from registry.client.api import RegistryApi
from registry.client.transfer import StorageForm

from .registry_fixtures import (  # noqa: F401  (fixtures)
    BASE,
    CALIBRATION,
    FIDELITY,
    deltactl,
    deltactl_json,
    deltas,
    registry,
    start_registry,
    with_base,
)


def sha256(path) -> str:
    return "sha256:" + hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_login_stores_a_checked_token_0600_and_env_overrides_it(start_registry, isolated_home):
    server = start_registry(auth_enabled=True, admin_token="dst_admin-secret", anonymous_read=False)
    tokens = isolated_home / "tokens.json"

    bad = deltactl("login", "--token", "dst_wrong")
    assert bad.exit_code == exit_codes.EXIT_AUTH
    assert "error: authentication: unknown or revoked token" in bad.stderr and not tokens.exists()

    empty = deltactl("login", input="\n")
    assert empty.exit_code == exit_codes.EXIT_AUTH and "needs a token" in empty.stderr

    ok = deltactl("login", "--registry", server.url + "/", input="dst_admin-secret\n")  # the hidden prompt
    assert ok.exit_code == 0, ok.output
    assert "logged in to" in ok.stdout and "as admin" in ok.stdout
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    assert json.loads(tokens.read_text()) == {server.url: "dst_admin-secret"}
    assert "dst_admin-secret" not in ok.output

    who = deltactl_json("whoami")
    assert who["name"] == "admin" and who["authenticated"] and who["registry"] == server.url

    wrong = deltactl("whoami", env={"DELTACTL_TOKEN": "dst_nope"})
    assert wrong.exit_code == exit_codes.EXIT_AUTH and "deltactl login" in wrong.stderr

    assert "removed the saved token" in deltactl("logout").stdout
    anonymous = deltactl("list")
    assert anonymous.exit_code == exit_codes.EXIT_AUTH and "needs a token" in anonymous.stderr


def test_push_list_show_pull_round_trip(deltas, with_base, monkeypatch, tmp_path):
    pushed = deltactl_json(
        "push", deltas.with_fidelity, "acme/math", "--tag", "prod", "--description", "math tune"
    )
    assert pushed["version"] == 1 and pushed["created_repository"] and not pushed["deduplicated"]
    assert (
        pushed["raw_digest"] == sha256(deltas.with_fidelity)
        and pushed["raw_size"] == deltas.with_fidelity.stat().st_size
    )
    assert pushed["sent_bytes"] == pushed["size"] and sorted(pushed["tags"]) == ["latest", "prod"]
    assert pushed["fidelity"] == FIDELITY and pushed["codec"] == "bitdelta"

    human = deltactl("push", deltas.other, "acme/math")
    assert human.exit_code == 0 and "pushed acme/math@2" in human.stdout and "sha256:" in human.stdout

    listed = deltactl_json("list")
    assert [r["full_name"] for r in listed] == ["acme/math"]
    latest = listed[0]["latest"]
    assert (
        listed[0]["base"] == BASE
        and latest["number"] == 2
        and latest["codec"] == "bitdelta"
        and latest["size_ratio"] > 1
    )
    assert deltactl_json("list", "--base", BASE) == listed
    table = deltactl("list")
    assert (
        table.exit_code == 0
        and "acme/math" in table.stdout
        and "bitdelta" in table.stdout
        and "v2" in table.stdout
    )

    shown = deltactl_json("show", "acme/math:prod")
    assert shown["repository"]["description"] == "math tune" and shown["selected"] == 1
    assert [v["number"] for v in shown["versions"]] == [2, 1]
    assert shown["versions"][1]["fidelity"] == FIDELITY
    assert json.loads(shown["versions"][1]["metadata"]["calibration"]) == CALIBRATION
    assert {t["name"]: t["version"] for t in shown["tags"]} == {"latest": 2, "prod": 1}
    text = deltactl("show", "acme/math@1")
    assert text.exit_code == 0
    assert (
        "fidelity.gain_recovered    0.91" in text.stdout and "fidelity.greedy_agreement  0.75" in text.stdout
    )
    assert "calibration.dataset" in text.stdout and "stdlib" in text.stdout

    pulled = deltactl_json("pull", "acme/math:prod")
    assert not pulled["cache_hit"] and pulled["version"] == 1 and pulled["downloaded_bytes"] == pushed["size"]
    assert open(pulled["path"], "rb").read() == deltas.with_fidelity.read_bytes()

    # the second pull is a cache hit: nothing is downloaded
    def no_download(*args, **kwargs):
        raise AssertionError("a cache hit must not download")

    monkeypatch.setattr("registry.client.pull.open_download", no_download)
    again = deltactl("pull", "acme/math@1", "-o", tmp_path / "out.bdelta")
    assert again.exit_code == 0, again.output
    assert "cache hit" in again.stderr and again.stdout.strip() == str(tmp_path / "out.bdelta")
    assert (tmp_path / "out.bdelta").read_bytes() == deltas.with_fidelity.read_bytes()


def test_pushing_identical_bytes_again_is_deduplicated_without_recompressing(deltas, with_base, monkeypatch):
    first = deltactl_json("push", deltas.plain, "acme/math")

    def no_compression(*args, **kwargs):
        raise AssertionError("the digests of an unchanged file are known")

    monkeypatch.setattr(StorageForm, "parts", no_compression)
    again = deltactl("push", deltas.plain, "acme/math")
    assert again.exit_code == 0, again.output
    assert "acme/math@2: identical bytes already in the registry, nothing uploaded (dedup)" in " ".join(
        again.stdout.split()
    )
    same = deltactl_json("push", deltas.plain, "acme/code")  # another repository, same bytes
    assert same["deduplicated"] and same["sent_bytes"] == 0 and same["digest"] == first["digest"]


def test_push_checks_the_file_and_the_base_before_uploading(deltas, registry, tmp_path):
    garbage = tmp_path / "garbage.bdelta"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    r = deltactl("push", garbage, "acme/math")
    assert r.exit_code == exit_codes.EXIT_INVALID and r.stderr.startswith("error: invalid delta file:")

    r = deltactl("push", deltas.plain, "acme/math")
    assert r.exit_code == exit_codes.EXIT_NOT_FOUND
    assert f"base model '{BASE}' is not registered" in r.stderr and "deltactl base add" in r.stderr

    r = deltactl("push", deltas.plain, "acme/math", "--base-path", deltas.base_dir, "--private")
    assert r.exit_code == 0, r.output
    assert deltactl_json("base", "ls")[0]["name"] == BASE

    registered = deltactl_json("base", "ls")[0]["fingerprint"]
    foreign = DeltaFile.open(deltas.foreign).metadata["base_fingerprint"]
    r = deltactl("push", deltas.foreign, "acme/math")  # same base name, other weights
    assert r.exit_code == exit_codes.EXIT_BASE_MISMATCH
    assert r.stderr == (
        f"error: base mismatch: acme/math holds deltas of base '{BASE}' with fingerprint {registered}, "
        f"but this delta was made for another checkpoint of that name (fingerprint {foreign})\n"
    )
    r = deltactl("push", deltas.foreign, "acme/other-ft")  # a repository to create: only the base is named
    assert r.exit_code == exit_codes.EXIT_BASE_MISMATCH
    assert r.stderr == (
        f"error: base mismatch: base '{BASE}' is registered with fingerprint {registered}, "
        f"but this delta was made for another checkpoint of that name (fingerprint {foreign})\n"
    )
    assert deltactl("show", "acme/other-ft").exit_code == exit_codes.EXIT_NOT_FOUND
    r = deltactl("push", deltas.plain, "acme/math", "--tag", "latest")
    assert r.exit_code == exit_codes.EXIT_INVALID and "maintained by the registry" in r.stderr
    assert [v["number"] for v in deltactl_json("show", "acme/math")["versions"]] == [1]


def test_base_rm_removes_a_base_no_repository_uses(deltas, registry):
    deltactl_json("base", "add", BASE, deltas.base_dir)
    deltactl_json("push", deltas.plain, "acme/math")
    fingerprint = deltactl_json("base", "ls")[0]["fingerprint"]
    r = deltactl("base", "rm", BASE, "--yes")
    assert r.exit_code == exit_codes.EXIT_CONFLICT
    assert r.stderr.startswith(
        f"error: conflict: base model '{BASE}' is used by 1 repository; delete it first"
    )
    r = deltactl("base", "rm", BASE, input="n\n")
    assert r.exit_code == exit_codes.EXIT_ERROR and f"Remove base {BASE} ({fingerprint})?" in r.stderr
    deltactl("rm", "acme/math", "--yes")
    r = deltactl("base", "rm", BASE, input="y\n")
    assert r.exit_code == 0 and r.stdout.splitlines()[-1] == f"removed base {BASE} ({fingerprint})"
    assert deltactl_json("base", "ls") == []
    r = deltactl("base", "rm", BASE, "--yes")
    assert (
        r.exit_code == exit_codes.EXIT_NOT_FOUND
        and r.stderr == f"error: not found: base model '{BASE}' is not registered\n"
    )


def test_base_add_registers_the_checkpoints_fingerprint(deltas, registry):
    from codec.checkpoint import Checkpoint

    added = deltactl_json("base", "add", BASE, deltas.base_dir)
    assert added["created"] and added["fingerprint"] == Checkpoint.open(deltas.base_dir).fingerprint()
    assert added["architecture"] == "LlamaForCausalLM" and added["parameter_count"] > 0
    again = deltactl("base", "add", BASE, deltas.base_dir)
    assert again.exit_code == 0 and "already registered" in again.stdout
    r = deltactl("base", "add", "no-org", deltas.base_dir)
    assert r.exit_code == exit_codes.EXIT_INVALID and "must be org/model" in r.stderr


def test_list_and_show_name_the_codec(deltas, with_base):
    deltactl_json("push", deltas.deltadq, "acme/dq")
    deltactl_json("push", deltas.plain, "acme/bits")
    codecs = {r["full_name"]: r["latest"]["codec"] for r in deltactl_json("list")}
    assert codecs == {"acme/dq": "deltadq", "acme/bits": "bitdelta"}
    assert "deltadq" in deltactl("show", "acme/dq").stdout
    assert [r["full_name"] for r in deltactl_json("list", "--search", "dq")] == ["acme/dq"]


def test_tag_and_rm(deltas, with_base):
    deltactl_json("push", deltas.plain, "acme/math")
    deltactl_json("push", deltas.other, "acme/math")
    assert deltactl_json("tag", "acme/math@1", "stable") == {
        "repository": "acme/math",
        "tag": "stable",
        "version": 1,
    }
    assert deltactl("tag", "acme/math", "newest").stdout.strip() == "acme/math:newest -> version 2"
    assert deltactl_json("pull", "acme/math:stable")["version"] == 1
    assert deltactl_json("tag", "acme/math", "newest", "--delete")["deleted"]
    assert deltactl("pull", "acme/math:newest").exit_code == exit_codes.EXIT_NOT_FOUND

    r = deltactl("rm", "acme/math@1", input="n\n")
    assert r.exit_code == exit_codes.EXIT_ERROR and "nothing deleted" in r.stderr
    r = deltactl("rm", "acme/math:stable", "--yes")
    assert r.exit_code == exit_codes.EXIT_INVALID and "by its number" in r.stderr
    r = deltactl("rm", "acme/math@1", input="y\n")
    assert r.exit_code == 0 and "Delete acme/math@1 and its tag(s) stable?" in r.stderr
    assert r.stdout.splitlines()[-1] == "deleted acme/math@1 and its tag(s) stable"  # after the echoed answer
    assert [v["number"] for v in deltactl_json("show", "acme/math")["versions"]] == [2]
    assert deltactl_json("rm", "acme/math@2", "--yes") == {"deleted": "acme/math@2", "removed_tags": []}
    assert deltactl_json("rm", "acme/math", "--yes") == {"deleted": "acme/math"}
    r = deltactl("show", "acme/math")
    assert (
        r.exit_code == exit_codes.EXIT_NOT_FOUND
        and r.stderr == "error: not found: repository acme/math does not exist\n"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pull_errors_have_distinct_exit_codes_and_one_line(deltas, with_base, start_registry):
    deltactl_json("push", deltas.plain, "acme/math")
    cases = [
        (
            ["pull", "acme/unknown"],
            exit_codes.EXIT_NOT_FOUND,
            "error: not found: repository acme/unknown does not exist",
        ),
        (["pull", "acme/math@9"], exit_codes.EXIT_NOT_FOUND, "error: not found: acme/math has no version 9"),
        (
            ["pull", "acme/math:nope"],
            exit_codes.EXIT_NOT_FOUND,
            "error: not found: acme/math has no tag 'nope'",
        ),
        (["pull", "Acme/Math"], exit_codes.EXIT_INVALID, "error: invalid request: invalid namespace 'Acme'"),
        (
            ["pull", "acme/math@x"],
            exit_codes.EXIT_INVALID,
            "error: invalid request: 'acme/math@x': a version after '@' is a number",
        ),
        (
            ["pull", "acme/math", "--registry", f"http://127.0.0.1:{_free_port()}"],
            exit_codes.EXIT_NETWORK,
            "error: network: cannot reach the registry at http://127.0.0.1:",
        ),
    ]
    for args, code, message in cases:
        r = deltactl(*args)
        assert r.exit_code == code, (args, r.output)
        assert r.stderr.startswith(message) and r.stderr.count("\n") == 1, (args, r.stderr)
        assert "Traceback" not in r.output

    start_registry(auth_enabled=True, admin_token="dst_right", anonymous_read=False)
    r = deltactl("pull", "acme/math", env={"DELTACTL_TOKEN": "dst_wrong"})
    assert r.exit_code == exit_codes.EXIT_AUTH and r.stderr.startswith(
        "error: authentication: unknown or revoked token"
    )

    debug = deltactl("--debug", "pull", "acme/unknown")
    assert debug.exit_code != 0 and type(debug.exception).__name__ == "NotFoundError"


def test_cache_verify_finds_a_corrupt_delta_and_pull_downloads_it_again(deltas, with_base):
    deltactl_json("push", deltas.plain, "acme/math")
    pulled = deltactl_json("pull", "acme/math")
    assert deltactl("cache", "verify").exit_code == 0

    blob = pulled["blob"]

    def corrupt() -> None:
        data = bytearray(open(blob, "rb").read())
        data[len(data) // 2] ^= 0xFF  # same size: only a re-hash notices
        with open(blob, "r+b") as fh:
            fh.write(data)

    # A pull re-hashes a cache hit: the corrupt copy is never served, it is downloaded again.
    corrupt()
    healed = deltactl_json("pull", "acme/math")
    assert healed["repaired"] and not healed["cache_hit"] and healed["downloaded_bytes"] > 0
    assert open(healed["path"], "rb").read() == deltas.plain.read_bytes()

    # `cache verify` finds corruption on its own, removes the copy, and the next pull restores it.
    corrupt()
    r = deltactl("cache", "verify")
    assert r.exit_code == exit_codes.EXIT_INVALID
    assert "corrupt" in r.stderr and "acme/math@1" in r.stderr and "1 corrupt" in r.stdout
    again = deltactl_json("pull", "acme/math")
    assert not again["cache_hit"] and not again["repaired"] and again["downloaded_bytes"] > 0
    assert open(again["path"], "rb").read() == deltas.plain.read_bytes()
    assert deltactl_json("cache", "verify")["ok"]


def test_cache_ls_and_prune(deltas, with_base, isolated_home):
    deltactl_json("push", deltas.plain, "acme/math")
    deltactl_json("push", deltas.other, "acme/math")
    deltactl_json("pull", "acme/math@1")
    deltactl_json("pull", "acme/math@2")
    listing = deltactl_json("cache", "ls")
    assert [e["ref"] for e in listing["entries"]] == ["acme/math@1", "acme/math@2"]
    assert all(e["present"] for e in listing["entries"])
    assert listing["blob_bytes"] == deltas.plain.stat().st_size + deltas.other.stat().st_size
    (isolated_home / "blobs" / f"{'0' * 64}-{'1' * 64}.zst.incomplete").write_bytes(b"partial")

    dry = deltactl_json("cache", "prune", "--older-than", "0", "--dry-run")
    assert dry["dry_run"] and {r["kind"] for r in dry["removed"]} >= {"version", "blob", "partial download"}
    assert len(deltactl_json("cache", "ls")["entries"]) == 2
    pruned = deltactl_json("cache", "prune", "--older-than", "0")
    assert pruned["freed"] >= listing["blob_bytes"]
    assert deltactl_json("cache", "ls") == {"root": str(isolated_home), "entries": [], "blob_bytes": 0}
    assert "holds no deltas" in deltactl("cache", "ls").stderr


def test_concurrent_pulls_of_one_blob_download_it_once(deltas, with_base, isolated_home, monkeypatch):
    deltactl_json("push", deltas.plain, "acme/math")
    deltactl_json("tag", "acme/math@1", "prod")
    downloads = []
    original = pulling.download

    def counted(http, cache, version, progress):
        downloads.append(version.number)
        return original(http, cache, version, progress)

    monkeypatch.setattr(pulling, "download", counted)
    results, failures = [], []

    def pull(ref: str) -> None:
        try:
            with RegistryApi() as api:
                results.append(api.pull(ref))
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [
        threading.Thread(target=pull, args=(ref,)) for ref in ("acme/math@1", "acme/math:prod", "acme/math")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures and len(results) == 3
    assert downloads == [1] and sorted(r.cache_hit for r in results) == [False, True, True]
    assert len({r.blob for r in results}) == 1 and sha256(results[0].blob) == sha256(deltas.plain)
    assert not list((isolated_home / "blobs").glob("*.incomplete"))
    assert os.path.realpath(results[0].path) == str(results[0].blob)


def test_a_version_is_found_by_its_digest(deltas, with_base, registry, tmp_path):
    import httpx

    first = deltactl_json("push", deltas.plain, "acme/math")
    deltactl_json("push", deltas.other, "acme/math")
    shown = deltactl_json("show", f"acme/math@{first['digest']}")
    assert shown["selected"] == 1
    pulled = deltactl_json("pull", f"acme/math@{first['digest']}", "-o", f"{tmp_path}/new/")
    assert pulled["version"] == 1 and pulled["path"] == str(tmp_path / "new" / "acme-math-v1.bdelta")
    assert (tmp_path / "new" / "acme-math-v1.bdelta").read_bytes() == deltas.plain.read_bytes()
    unknown = "sha256:" + "0" * 64
    r = deltactl("pull", f"acme/math@{unknown}")
    assert (
        r.exit_code == exit_codes.EXIT_NOT_FOUND
        and f"acme/math has no version with digest {unknown}" in r.stderr
    )
    # the server's filter: exactly the version of that digest, and a malformed digest is a 422
    page = httpx.get(f"{registry.url}/v1/repos/acme/math/versions", params={"digest": first["digest"]}).json()
    assert [v["number"] for v in page["items"]] == [1]
    assert (
        httpx.get(f"{registry.url}/v1/repos/acme/math/versions", params={"digest": "sha256:xyz"}).status_code
        == 422
    )
    # rm by digest removes that version, not the repository
    assert deltactl("rm", f"acme/math@{first['digest']}", "--yes").exit_code == 0
    assert [v["number"] for v in deltactl_json("show", "acme/math")["versions"]] == [2]


def test_pushing_a_file_that_is_not_a_delta_names_it(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 200)  # a zip archive (torch.save), not safetensors
    r = deltactl("push", path, "acme/math", "--registry", f"http://127.0.0.1:{_free_port()}")
    assert r.exit_code == exit_codes.EXIT_INVALID
    assert (
        r.stderr == f"error: invalid delta file: {path} is not a deltastore delta (not a safetensors file)\n"
    )


def test_push_with_the_wrong_base_path_registers_nothing(deltas, registry, llama_pair_fp16_tied):
    other_base, _ = llama_pair_fp16_tied
    r = deltactl("push", deltas.plain, "acme/math", "--base-path", other_base)
    assert r.exit_code == exit_codes.EXIT_BASE_MISMATCH, r.output
    assert (
        f"{other_base} is not the base this delta was made for" in r.stderr
        and "nothing was registered" in r.stderr
    )
    assert deltactl_json("base", "ls") == [] and deltactl_json("list") == []
    # the right base can still be registered under the delta's name
    r = deltactl("push", deltas.plain, "acme/math", "--base-path", deltas.base_dir)
    assert r.exit_code == 0, r.output
    assert [b["name"] for b in deltactl_json("base", "ls")] == [BASE]


def test_base_add_refuses_a_delta_and_a_file_without_weights(deltas, registry, tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    r = deltactl("base", "add", "org/x", deltas.plain)
    assert r.exit_code == exit_codes.EXIT_INVALID
    assert f"{deltas.plain} is a deltastore delta, not a model checkpoint" in r.stderr
    ints = tmp_path / "ints.safetensors"
    save_file({"position_ids": np.arange(8, dtype=np.int64)}, str(ints))
    r = deltactl("base", "add", "org/x", ints)
    assert r.exit_code == exit_codes.EXIT_INVALID and "holds no model weights" in r.stderr
    assert deltactl_json("base", "ls") == []


def test_push_names_the_base_when_the_delta_records_no_registry_name(deltas, registry, llama_pair, tmp_path):
    from codec.compress import compress

    unnamed = tmp_path / "unnamed.bdelta"
    compress(*llama_pair, unnamed)  # records the directory name, 'base'
    r = deltactl("push", unnamed, "acme/math", "--base-path", llama_pair[0])
    assert r.exit_code == exit_codes.EXIT_INVALID, r.output
    assert "the delta records its base as 'base', which is not a registry name" in r.stderr
    assert "(pass --base-name ORG/MODEL)" in r.stderr and deltactl_json("base", "ls") == []
    pushed = deltactl_json("push", unnamed, "acme/math", "--base-path", llama_pair[0], "--base-name", BASE)
    assert pushed["version"] == 1 and [b["name"] for b in deltactl_json("base", "ls")] == [BASE]


def test_a_pinned_version_in_the_cache_is_served_without_the_registry(
    deltas, with_base, registry, isolated_home
):
    pushed = deltactl_json("push", deltas.plain, "acme/math")
    assert not deltactl_json("pull", "acme/math@1")["cache_hit"]
    registry.stop()

    for ref in ("acme/math@1", f"acme/math@{pushed['digest']}"):
        served = deltactl_json("pull", ref)
        assert served["cache_hit"] and served["offline"] and served["version"] == 1
        assert open(served["path"], "rb").read() == deltas.plain.read_bytes()
    moving = deltactl("pull", "acme/math")  # latest can move: it needs the registry
    assert moving.exit_code == exit_codes.EXIT_NETWORK and "cannot reach the registry" in moving.stderr
    never = deltactl("pull", "acme/math@2")
    assert never.exit_code == exit_codes.EXIT_NETWORK and "cannot reach the registry" in never.stderr

    # DELTACTL_OFFLINE=1 never touches the network: a listener on the registry's port sees nothing
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", registry.port))
    listener.listen(8)
    listener.settimeout(0.2)
    try:
        offline = {"DELTACTL_OFFLINE": "1"}
        r = deltactl("pull", "acme/math@1", "--json", env=offline)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["offline"]
        tag = deltactl("pull", "acme/math:latest", env=offline)
        assert tag.exit_code == exit_codes.EXIT_NETWORK and tag.stderr.startswith(
            "error: offline: acme/math:latest can move"
        )
        listed = deltactl("list", env=offline)
        assert (
            listed.exit_code == exit_codes.EXIT_NETWORK
            and "the client is offline (DELTACTL_OFFLINE)" in listed.stderr
        )
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        (
            "DELTACTL_UPLOAD_CONCURRENCY",
            "abc",
            "Input should be a valid integer, unable to parse string as an integer",
        ),
        ("DELTACTL_UNAVAILABLE_MAX_WAIT", "-5", "Input should be greater than or equal to 0"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(name, value, says):
    for command in (["list"], ["cache", "ls"]):
        r = deltactl(*command, env={name: value})
        assert r.exit_code == exit_codes.EXIT_USAGE, (command, r.output)
        assert r.stderr == f"error: invalid setting: {name}={value!r}: {says}\n"
