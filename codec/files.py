"""Files on disk, done once for every layer: the read/write unit, the sha256 of a file, fsync of a
directory, and the atomic writer that every output (deltas, downloads, cache records, logins) goes through.

    with AtomicWriter(out, inputs=[base_dir, ft_path]) as fh:   # refuses to clobber an input
        fh.write(data)                                           # renamed over `out` on success only
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from .errors import CodecError

#: Read/write unit of hashing, copying and transfers.
CHUNK = 1 << 20
_HASH_CHUNK = 8 * CHUNK

# The process's umask, read once: mkstemp creates files 0600 and outputs should get the mode
# a plain open() would give them.
_UMASK = os.umask(0)
os.umask(_UMASK)
DEFAULT_MODE = 0o666 & ~_UMASK


class OutputPathError(CodecError, OSError):
    """An output path that cannot be written safely (a device, an input, a directory)."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """`sha256:<hex>` of the file's bytes."""
    with open(path, "rb") as fh:
        return sha256_fileobj(fh)


def sha256_fileobj(fh: IO[bytes]) -> str:
    """`sha256:<hex>` of what is left to read in `fh`."""
    h = hashlib.sha256()
    while buf := fh.read(_HASH_CHUNK):
        h.update(buf)
    return "sha256:" + h.hexdigest()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def output_file(path: str | os.PathLike[str], default_name: str) -> Path:
    """Where an output named `path` goes: `path/default_name` when `path` is an existing directory
    or is written with a trailing slash (the directory is created), else `path` itself."""
    text = os.fspath(path)
    if text.endswith(("/", os.sep)):
        folder = Path(text)
        if folder.exists() and not folder.is_dir():
            raise OutputPathError(f"{text}: a trailing slash names a directory, but this is a file")
        folder.mkdir(parents=True, exist_ok=True)
        return folder / default_name
    return Path(text) / default_name if Path(text).is_dir() else Path(text)


def check_output(path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """`path` if a regular file may be (re)placed there: refuses an existing directory, device,
    FIFO or socket (never replaced by a rename), and any path that is one of `inputs` (same file,
    through links too) or lies inside an input directory."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else _kind(st.st_mode)
        raise OutputPathError(f"{path} is {kind}, not a regular file: refusing to write a file over it")
    real = Path(os.path.realpath(path))
    for source in inputs:
        source_real = Path(os.path.realpath(source))
        same = real == source_real or (
            st is not None and os.path.exists(source) and os.path.samefile(path, source)
        )
        if same:
            raise OutputPathError(f"output {path} is the input {source}: refusing to overwrite it")
        if source_real.is_dir() and source_real in real.parents:
            raise OutputPathError(
                f"output {path} lies inside the input directory {source}: refusing to write there"
            )
    return path


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


class AtomicWriter:
    """A binary file that appears at `path` complete or not at all. Bytes go to a fresh temp file
    in the same directory (mkstemp: O_CREAT|O_EXCL|O_NOFOLLOW, an unguessable name, so a link
    planted there is never followed); `commit()` fsyncs it and renames it over `path`; `abort()`,
    and every failure inside `with`, removes it. `inputs` are files and directories the output
    must not be or lie in (see `check_output`); `mode` is the file's mode from its creation on."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        inputs: Iterable[str | os.PathLike[str]] = (),
        mode: int = DEFAULT_MODE,
        durable: bool = True,
    ):
        self.path = check_output(path, inputs)
        self.durable = durable
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".incomplete")
        self.tmp = Path(tmp)
        try:
            os.fchmod(fd, mode)
            self.file: IO[bytes] = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise
        self._done = False

    def write(self, data) -> int:
        return self.file.write(data)

    def commit(self) -> Path:
        if self._done:
            return self.path
        try:
            self.file.flush()
            if self.durable:
                os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        if self.durable:
            fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> IO[bytes]:
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = DEFAULT_MODE) -> Path:
    """Replace the file at `path` with `data` atomically (see AtomicWriter)."""
    with AtomicWriter(path, mode=mode) as fh:
        fh.write(data)
    return Path(path)


def temp_dir_beside(path: str | os.PathLike[str]) -> Path:
    """A fresh, private directory next to `path` (mkdtemp) to build a directory output in before
    it is renamed into place."""
    path = Path(path)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".incomplete"))
