"""registry.client.cache: the layout under DELTACTL_HOME, version records and their links, the
re-hash of every hit, verify/prune (foreign and half-written entries, locks held by others) and
the push state kept between runs, on real files in a temp directory."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from filelock import FileLock

from codec.storage import BlobInfo
from registry.client.cache import DeltaCache, registry_dir_name
from registry.client.errors import CacheError
from registry.client.transfer import StorageForm

REGISTRY = "http://127.0.0.1:8000"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _put_blob(cache: DeltaCache, data: bytes) -> Path:
    path = cache.blob_path(_digest(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _version(data: bytes, number: int, repository: str = "acme/math") -> dict:
    return {
        "repository": repository,
        "number": number,
        "digest": "sha256:" + f"{number:x}" * 64,
        "size": len(data) // 2,
        "raw_digest": _digest(data),
        "raw_size": len(data),
        "codec": "bitdelta-1",
        "tags": ["latest"],
        "created_at": "not kept",
    }


@pytest.fixture
def cache(tmp_path) -> DeltaCache:
    return DeltaCache(tmp_path / "home")


def _age(path: Path, days: float) -> None:
    then = time.time() - days * 86400
    os.utime(path, (then, then))


# --- layout ----------------------------------------------------------------------------------


def test_paths_derive_from_the_digest_with_or_without_its_prefix(cache):
    hex64 = "ab" * 32
    assert cache.blob_path("sha256:" + hex64) == cache.root / "blobs" / f"{hex64}.bdelta"
    assert cache.blob_path(hex64) == cache.blob_path("sha256:" + hex64)
    assert cache.partial_path("sha256:" + hex64, "sha256:" + "cd" * 32) == (
        cache.root / "blobs" / f"{hex64}-{'cd' * 32}.zst.incomplete"
    )


@pytest.mark.parametrize(
    "digest", ["../../etc/passwd", "sha256:" + "AB" * 32, "sha256:" + "a" * 63, "md5:" + "a" * 64]
)
def test_a_name_that_is_not_a_sha256_digest_never_becomes_a_path(cache, digest):
    with pytest.raises(CacheError) as err:
        cache.blob_path(digest)
    assert str(err.value) == f"not a sha256 digest: {digest!r}"
    with pytest.raises(CacheError):
        cache.blob_lock(digest)


@pytest.mark.parametrize(
    ("url", "folder"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1-8000"),
        ("https://registry.example.com/team/a/", "registry.example.com-team-a"),
        ("https://user@host:443", "host-443"),  # credentials never reach the file system
        ("https://user:s3cret@host/r", "host-r"),
        ("", "registry"),
    ],
)
def test_each_registry_gets_one_safe_directory_name(url, folder):
    assert registry_dir_name(url) == folder


# --- cache hits ------------------------------------------------------------------------------


def test_a_hit_is_the_blob_only_with_the_recorded_size_and_digest(cache):
    data = b"delta bytes " * 100
    assert cache.cached_blob(_digest(data), len(data)) is None  # nothing there yet
    path = _put_blob(cache, data)
    assert cache.cached_blob(_digest(data), len(data)) == path
    assert cache.cached_blob(_digest(data), len(data) + 1) is None
    assert path.exists() and cache.corrupt_found == []  # a size mismatch is not corruption


def test_a_corrupt_hit_of_the_right_size_is_removed_and_reported(cache):
    data = b"delta bytes " * 100
    path = _put_blob(cache, data)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(flipped))
    assert cache.cached_blob(_digest(data), len(data)) is None
    assert not path.exists() and cache.corrupt_found == [str(path)]


# --- version records -------------------------------------------------------------------------


def test_a_recorded_version_keeps_what_the_registry_said_and_links_to_its_blob(cache):
    data = b"one"
    blob = _put_blob(cache, data)
    link = cache.record_version(REGISTRY, _version(data, 3))
    folder = cache.root / "repos" / "127.0.0.1-8000" / "acme" / "math"
    assert link == folder / "3.bdelta" and link.is_symlink()
    assert not os.path.isabs(os.readlink(link))  # relative: the cache can be moved as a whole
    assert link.resolve() == blob.resolve() and link.read_bytes() == data
    record = json.loads((folder / "3.json").read_text())
    assert record == {
        "registry": REGISTRY,
        "repository": "acme/math",
        "number": 3,
        "digest": _version(data, 3)["digest"],
        "size": 1,
        "raw_digest": _digest(data),
        "raw_size": 3,
        "codec": "bitdelta-1",
        "tags": ["latest"],
    }
    assert sorted(p.name for p in folder.iterdir()) == ["3.bdelta", "3.json"]  # no temp file left


def test_recording_again_repoints_a_link_to_the_new_blob(cache):
    first, second = b"first", b"second"
    cache.record_version(REGISTRY, _version(first, 1))
    link = cache.record_version(REGISTRY, _version(second, 1))
    assert os.path.basename(os.readlink(link)) == cache.blob_path(_digest(second)).name
    assert cache.recorded_version(REGISTRY, "acme/math", number=1)["raw_digest"] == _digest(second)
    assert not list(link.parent.glob("*.incomplete")) and not list(link.parent.glob(".*"))


def test_a_recorded_version_is_found_by_number_or_by_stored_digest(cache):
    cache.record_version(REGISTRY, _version(b"a", 1))
    cache.record_version(REGISTRY, _version(b"b", 2))
    assert cache.recorded_version(REGISTRY, "acme/math", number=2)["raw_digest"] == _digest(b"b")
    by_digest = cache.recorded_version(REGISTRY, "acme/math", digest=_version(b"b", 2)["digest"])
    assert by_digest["number"] == 2
    assert cache.recorded_version(REGISTRY, "acme/math", number=7) is None
    assert cache.recorded_version(REGISTRY, "acme/math", digest="sha256:" + "f" * 64) is None
    assert cache.recorded_version("http://127.0.0.1:9000", "acme/math", number=1) is None  # other registry
    assert cache.recorded_version(REGISTRY, "acme/other", number=1) is None


def test_a_record_that_is_foreign_or_half_written_resolves_to_nothing(cache):
    cache.record_version(REGISTRY, _version(b"a", 1))
    folder = cache.root / "repos" / "127.0.0.1-8000" / "acme" / "math"
    (folder / "2.json").write_text('{"repository": "acme/math", "num')  # cut short
    (folder / "3.json").write_text(json.dumps(_version(b"c", 3, repository="evil/math")))
    (folder / "4.json").write_text("[1, 2]")
    assert cache.recorded_version(REGISTRY, "acme/math", number=2) is None
    assert cache.recorded_version(REGISTRY, "acme/math", number=3) is None
    assert cache.recorded_version(REGISTRY, "acme/math", number=4) is None
    assert cache.recorded_version(REGISTRY, "acme/math", digest=_version(b"c", 3)["digest"]) is None


# --- listing ---------------------------------------------------------------------------------


def test_entries_are_sorted_and_say_whether_their_blob_is_there(cache):
    present, short, gone = b"present", b"will be cut", b"gone"
    _put_blob(cache, present)
    _put_blob(cache, short).write_bytes(short[:-1])
    cache.record_version("http://b.example", _version(present, 1))
    cache.record_version(REGISTRY, _version(gone, 10, repository="acme/zeta"))
    cache.record_version(REGISTRY, _version(short, 2))
    cache.record_version(REGISTRY, _version(present, 10))
    entries = cache.entries()
    assert [(e.registry, e.ref) for e in entries] == [
        ("http://127.0.0.1:8000", "acme/math@2"),
        ("http://127.0.0.1:8000", "acme/math@10"),  # by number, not by name
        ("http://127.0.0.1:8000", "acme/zeta@10"),
        ("http://b.example", "acme/math@1"),
    ]
    assert [e.present for e in entries] == [False, True, False, True]
    listed = entries[1].as_dict()
    assert listed["ref"] == "acme/math@10" and listed["path"].endswith("math/10.bdelta")
    assert listed["blob"] == str(cache.blob_path(_digest(present)))


def test_entries_skip_what_is_not_a_record_of_ours(cache):
    cache.record_version(REGISTRY, _version(b"a", 1))
    folder = cache.root / "repos" / "127.0.0.1-8000" / "acme" / "math"
    (folder / "notes.json").write_text(json.dumps(_version(b"b", 2)))  # not a version number
    (folder / "3.json").write_text("{broken")
    (folder / "4.json").write_text(json.dumps({"repository": "acme/math"}))  # keys missing
    bad = dict(_version(b"e", 5), registry=REGISTRY, raw_digest="sha256:../../x")
    (folder / "5.json").write_text(json.dumps(bad))
    assert [e.ref for e in cache.entries()] == ["acme/math@1"]


def test_touch_marks_a_version_used_now(cache):
    cache.record_version(REGISTRY, _version(b"a", 1))
    record = cache.root / "repos" / "127.0.0.1-8000" / "acme" / "math" / "1.json"
    _age(record, 30)
    assert time.time() - cache.entries()[0].last_used.timestamp() > 29 * 86400
    cache.touch(REGISTRY, "acme/math", 1)
    assert time.time() - cache.entries()[0].last_used.timestamp() < 60
    cache.touch(REGISTRY, "acme/math", 99)  # never pulled: nothing to mark, no error


def test_blobs_are_only_files_named_by_a_digest(cache):
    blob = _put_blob(cache, b"x")
    for name in (
        "notes.bdelta",
        "A" * 64 + ".bdelta",
        "a" * 64 + ".lock",
        "a" * 64 + "-" + "b" * 64 + ".zst.incomplete",
    ):
        (cache.blob_dir / name).write_bytes(b"foreign")
    assert cache.blobs() == [blob]


# --- verify ----------------------------------------------------------------------------------


def test_verify_rehashes_every_blob_and_names_the_refs_of_a_corrupt_one(cache):
    good, bad = b"good " * 10, b"bad " * 10
    _put_blob(cache, good)
    corrupt = _put_blob(cache, bad)
    corrupt.write_bytes(b"BAD " * 10)
    cache.record_version(REGISTRY, _version(bad, 1))
    cache.record_version(REGISTRY, _version(bad, 2, repository="acme/copy"))
    cache.record_version(REGISTRY, _version(b"never pulled", 3))
    (cache.blob_dir / "notes.bdelta").write_bytes(b"foreign, not checked")

    report = cache.verify()
    assert not report.ok and report.checked == 2 and report.bytes == len(good) + len(bad)
    assert report.corrupt == [
        {
            "path": str(corrupt),
            "expected": _digest(bad),
            "actual": _digest(b"BAD " * 10),
            "refs": ["acme/copy@2", "acme/math@1"],
            "removed": True,
        }
    ]
    assert report.missing == ["acme/math@3"]
    assert not corrupt.exists() and cache.blob_path(_digest(good)).exists()
    assert report.as_dict()["ok"] is False

    again = cache.verify()
    assert again.ok and again.checked == 1
    assert sorted(again.missing) == ["acme/copy@2", "acme/math@1", "acme/math@3"]


def test_verify_can_report_corruption_without_removing_it(cache):
    path = _put_blob(cache, b"data")
    path.write_bytes(b"DATA")
    report = cache.verify(remove_corrupt=False)
    assert report.corrupt[0]["removed"] is False and path.read_bytes() == b"DATA"


# --- prune -----------------------------------------------------------------------------------


def test_prune_removes_unlinked_blobs_partials_and_nothing_in_use(cache):
    kept, orphan = b"kept", b"orphan!"
    kept_blob, orphan_blob = _put_blob(cache, kept), _put_blob(cache, orphan)
    cache.record_version(REGISTRY, _version(kept, 1))
    partial = cache.partial_path(_digest(b"p"), "sha256:" + "1" * 64)
    partial.write_bytes(b"12345")
    cut = cache.blob_dir / f".{_digest(b'q')[7:]}.bdelta.x1y2.incomplete"  # a decompression cut short
    cut.write_bytes(b"123")

    dry = cache.prune(dry_run=True)
    assert dry.dry_run and sorted((r["kind"], r["bytes"]) for r in dry.removed) == [
        ("blob", len(orphan)),
        ("partial download", 3),
        ("partial download", 5),
    ]
    assert dry.freed == len(orphan) + 8 and orphan_blob.exists() and partial.exists() and cut.exists()

    done = cache.prune()
    assert done.as_dict()["freed"] == dry.freed and not done.dry_run
    assert not orphan_blob.exists() and not partial.exists() and not cut.exists()
    assert kept_blob.exists() and [e.ref for e in cache.entries()] == ["acme/math@1"]


def test_prune_by_age_drops_old_versions_and_then_their_blobs(cache):
    old, recent, shared = b"old", b"recent", b"shared"
    for data in (old, recent, shared):
        _put_blob(cache, data)
    cache.record_version(REGISTRY, _version(old, 1))
    cache.record_version(REGISTRY, _version(recent, 2))
    cache.record_version(REGISTRY, _version(shared, 3))
    cache.record_version(REGISTRY, _version(shared, 1, repository="acme/fresh"))
    folder = cache.root / "repos" / "127.0.0.1-8000" / "acme" / "math"
    _age(folder / "1.json", 10)
    _age(folder / "3.json", 10)

    report = cache.prune(older_than_days=7)
    removed = {(r["kind"], Path(r["path"]).name) for r in report.removed}
    assert removed == {
        ("version", "1.json"),
        ("link", "1.bdelta"),
        ("version", "3.json"),
        ("link", "3.bdelta"),
        ("blob", cache.blob_path(_digest(old)).name),
    }
    assert [e.ref for e in cache.entries()] == ["acme/fresh@1", "acme/math@2"]
    assert cache.blob_path(_digest(shared)).exists()  # another version still links to it


def test_prune_leaves_what_a_running_command_has_locked(cache):
    orphan = _put_blob(cache, b"being pulled")
    partial = cache.partial_path(_digest(b"downloading"), "sha256:" + "2" * 64)
    partial.write_bytes(b"half")
    cache.upload_dir.mkdir(parents=True)
    for key in ("busy", "idle"):
        (cache.upload_dir / f"{key}.json").write_text("{}")
        (cache.upload_dir / f"{key}.zst").write_bytes(b"staged")
    # held by other lock objects, as another process would hold them
    with (
        FileLock(cache.blob_dir / f"{_digest(b'being pulled')[7:]}.lock"),
        FileLock(cache.blob_dir / f"{_digest(b'downloading')[7:]}.lock"),
        FileLock(cache.upload_dir / "busy.lock"),
    ):
        report = cache.prune()
    assert {Path(r["path"]).name for r in report.removed} == {"idle.json", "idle.zst"}
    assert orphan.exists() and partial.exists()
    assert (cache.upload_dir / "busy.zst").exists() and not (cache.upload_dir / "idle.zst").exists()
    assert {r["kind"] for r in cache.prune().removed} == {"blob", "partial download", "push state"}


def test_prune_of_an_empty_or_missing_cache_removes_nothing(cache):
    assert cache.prune().as_dict() == {"removed": [], "freed": 0, "dry_run": False}
    assert cache.verify().as_dict() == {"checked": 0, "bytes": 0, "corrupt": [], "missing": [], "ok": True}


# --- push state ------------------------------------------------------------------------------


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "d.bdelta"
    path.write_bytes(os.urandom(1000) + b"\0" * 50_000)
    return path


def _info(source: Path) -> BlobInfo:
    form = StorageForm(source, part_size=1 << 20)
    b"".join(form.parts())
    return form.info


def test_push_state_survives_between_runs_of_the_same_file(cache, source):
    info = _info(source)
    with cache.push_state(source) as state:
        assert state.blob is None and state.upload_id("reg/acme/math") is None
        state.remember_upload("reg/acme/math", "u-1", None)  # streamed: declared without digests
        state.remember_upload("reg/acme/other", "u-2", info)
        state.remember_blob(info)
    with cache.push_state(source) as again:
        assert again.state_path == state.state_path
        assert again.blob == info
        assert again.upload_id("reg/acme/math") == "u-1" and again.upload_declared("reg/acme/math") is None
        assert again.upload_id("reg/acme/other") == "u-2" and again.upload_declared("reg/acme/other") == info


def test_a_changed_file_is_a_new_push(cache, source):
    with cache.push_state(source) as state:
        state.remember_blob(_info(source))
        state.remember_upload("reg/acme/math", "u-1", None)
    source.write_bytes(source.read_bytes()[:-1] + b"\1")
    with cache.push_state(source) as changed:
        assert changed.state_path != state.state_path
        assert changed.blob is None and changed.upload_id("reg/acme/math") is None


def test_a_state_file_for_another_identity_is_not_trusted(cache, source):
    with cache.push_state(source) as state:
        state.remember_blob(_info(source))
        state.remember_upload("reg/acme/math", "u-1", None)
    saved = json.loads(state.state_path.read_text())
    saved["identity"][0] = "/elsewhere"
    state.state_path.write_text(json.dumps(saved))
    with cache.push_state(source) as again:
        assert again.blob is None and again.upload_id("reg/acme/math") is None


def test_a_state_file_of_an_older_client_is_read_as_no_pending_upload(cache, source):
    """Older clients saved an upload as its bare id (their uploads were declared with digests
    and staged bytes that are no longer kept): such an entry is no upload to resume."""
    with cache.push_state(source) as state:
        state.remember_blob(_info(source))
    saved = json.loads(state.state_path.read_text())
    saved["uploads"] = {"reg/acme/math": "u-old"}
    state.state_path.write_text(json.dumps(saved))
    with cache.push_state(source) as again:
        assert again.upload_id("reg/acme/math") is None and again.blob == _info(source)


def test_finish_drops_the_upload_and_keeps_the_digests(cache, source):
    with cache.push_state(source) as state:
        state.remember_blob(_info(source))
        state.remember_upload("a/acme/math", "u-1", None)
        state.remember_upload("b/acme/math", "u-2", None)
        state.finish("a/acme/math")
        assert state.upload_id("a/acme/math") is None and state.upload_id("b/acme/math") == "u-2"
    with cache.push_state(source) as done:
        assert done.blob == _info(source)  # kept: a push of the same bytes asks the registry first
        assert set(json.loads(done.state_path.read_text())["uploads"]) == {"b/acme/math"}
