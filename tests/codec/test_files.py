"""codec.files: the one atomic writer every output goes through never replaces a device or FIFO,
never overwrites an input, never follows a planted link, and leaves no temp file behind."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from codec.files import AtomicWriter, OutputPathError, check_output, output_file, sha256_file, write_atomic


def _only(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_sha256_file_is_the_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"abc" * 100_000)
    assert sha256_file(path) == "sha256:" + hashlib.sha256(b"abc" * 100_000).hexdigest()


def test_commit_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with AtomicWriter(target) as fh:
        fh.write(b"new bytes")
    assert target.read_bytes() == b"new bytes" and _only(tmp_path) == ["out.bin"]


def test_a_failure_removes_the_temp_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), AtomicWriter(target) as fh:
        fh.write(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and _only(tmp_path) == ["out.bin"]


def test_mode_is_set_from_creation_on(tmp_path):
    path = write_atomic(tmp_path / "tokens.json", b"{}", mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("kind", ["fifo", "dev-null"])
def test_a_device_or_fifo_is_refused_and_left_as_it_is(tmp_path, kind):
    if kind == "fifo":
        target = tmp_path / "pipe"
        os.mkfifo(target)
        what = "a FIFO"
    else:
        target = "/dev/null"
        what = "a character device"
    with pytest.raises(OutputPathError, match=f"{target} is {what}, not a regular file"):
        AtomicWriter(target)
    mode = os.stat(target).st_mode
    assert stat.S_ISFIFO(mode) if kind == "fifo" else stat.S_ISCHR(mode)
    if kind == "fifo":
        assert _only(tmp_path) == ["pipe"]


def test_an_existing_directory_is_refused_without_a_temp_file(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputPathError, match="is a directory"):
        AtomicWriter(tmp_path / "d")
    assert _only(tmp_path) == ["d"]


def test_an_input_is_never_the_output(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"weights")
    os.link(weights, tmp_path / "hardlink.safetensors")
    os.symlink(weights, tmp_path / "symlink.safetensors")
    for output in (weights, tmp_path / "hardlink.safetensors", tmp_path / "symlink.safetensors"):
        with pytest.raises(OutputPathError, match="is the input"):
            check_output(output, [weights])
    with pytest.raises(OutputPathError, match="lies inside the input directory"):
        check_output(model / "new.bdelta", [model])
    assert check_output(tmp_path / "elsewhere.bdelta", [model, weights]) == tmp_path / "elsewhere.bdelta"
    assert weights.read_bytes() == b"weights"


def test_a_link_planted_at_a_temp_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # The names a writer with predictable temp names would have used.
    for name in ("d.bdelta.incomplete", ".d.bdelta.incomplete", f".d.bdelta.{os.getpid()}.incomplete"):
        os.symlink(victim, out_dir / name)
    writer = AtomicWriter(out_dir / "d.bdelta")
    assert not writer.tmp.is_symlink() and writer.tmp.parent == out_dir
    writer.write(b"delta")
    writer.commit()
    assert victim.read_bytes() == b"precious" and (out_dir / "d.bdelta").read_bytes() == b"delta"


def test_two_writers_of_one_path_get_different_temp_files(tmp_path):
    a, b = AtomicWriter(tmp_path / "x"), AtomicWriter(tmp_path / "x")
    try:
        assert a.tmp != b.tmp
    finally:
        a.abort()
        b.abort()
    assert _only(tmp_path) == []


def test_output_file_trailing_slash_means_a_directory(tmp_path):
    assert output_file(f"{tmp_path}/new/", "d.bdelta") == tmp_path / "new" / "d.bdelta"
    assert (tmp_path / "new").is_dir()
    assert output_file(tmp_path / "new", "e.bdelta") == tmp_path / "new" / "e.bdelta"  # an existing directory
    assert output_file(tmp_path / "f.bdelta", "e.bdelta") == tmp_path / "f.bdelta"
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OutputPathError, match="trailing slash names a directory"):
        output_file(f"{tmp_path}/file/", "d.bdelta")
