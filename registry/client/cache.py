"""The client's local cache under DELTACTL_HOME: pulled deltas, decompressed so they can be
memory-mapped, and the state of pushes in progress.

    blobs/<raw sha256>.bdelta                          a delta, named by the sha256 of its bytes
    blobs/<raw sha256>-<stored sha256>.zst.incomplete   a partial download (resumed with Range)
    repos/<registry>/<namespace>/<name>/<n>.json        what the registry said of version n
    repos/<registry>/<namespace>/<name>/<n>.bdelta      symlink to its blob
    uploads/<file key>.json                             a push: digests, pending upload ids

Every file is written to a fresh temp file and renamed (codec.files.AtomicWriter); a file lock
per blob (and per pushed file) keeps concurrent commands from writing the same thing twice.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from filelock import FileLock, Timeout

from codec.files import sha256_file, write_atomic
from codec.storage import BlobInfo
from registry.client.errors import CacheError

_HEX64 = re.compile(r"[0-9a-f]{64}")
_BLOB_NAME = re.compile(r"([0-9a-f]{64})\.bdelta")


def _hex(digest: str) -> str:
    value = digest.removeprefix("sha256:")
    if not _HEX64.fullmatch(value):
        raise CacheError(f"not a sha256 digest: {digest!r}")
    return value


def registry_dir_name(registry: str) -> str:
    """`http://127.0.0.1:8000` -> `127.0.0.1-8000`: one directory per registry. Credentials in the
    URL (`user:token@`) never reach the name."""
    parts = urlsplit(registry)
    host = parts.netloc.rpartition("@")[2]
    return re.sub(r"[^A-Za-z0-9._]+", "-", host + parts.path).strip("-") or "registry"


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True).encode())


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class CacheEntry:
    """One pulled version."""

    registry: str
    repository: str
    number: int
    digest: str
    raw_digest: str
    raw_size: int
    codec: str | None
    path: Path  # the version's link
    blob: Path
    present: bool  # the blob is there with the recorded size
    last_used: dt.datetime

    @property
    def ref(self) -> str:
        return f"{self.repository}@{self.number}"

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(
            path=str(self.path), blob=str(self.blob), last_used=self.last_used.isoformat(), ref=self.ref
        )
        return out


@dataclass
class VerifyReport:
    checked: int = 0
    bytes: int = 0
    corrupt: list[dict] = field(default_factory=list)  # {path, expected, actual, refs, removed}
    missing: list[str] = field(default_factory=list)  # refs whose blob is gone

    @property
    def ok(self) -> bool:
        return not self.corrupt

    def as_dict(self) -> dict:
        return {
            "checked": self.checked,
            "bytes": self.bytes,
            "corrupt": self.corrupt,
            "missing": self.missing,
            "ok": self.ok,
        }


@dataclass
class PruneReport:
    removed: list[dict] = field(default_factory=list)  # {kind, path, bytes}
    dry_run: bool = False

    @property
    def freed(self) -> int:
        return sum(r["bytes"] for r in self.removed)

    def as_dict(self) -> dict:
        return {"removed": self.removed, "freed": self.freed, "dry_run": self.dry_run}


class DeltaCache:
    """The cache directory. All paths derive from digests and validated names."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.repo_dir = self.root / "repos"
        self.upload_dir = self.root / "uploads"
        self.corrupt_found: list[str] = []  # cached deltas found corrupt (and removed) by cached_blob

    # --- blobs -----------------------------------------------------------------------------
    def blob_path(self, raw_digest: str) -> Path:
        return self.blob_dir / f"{_hex(raw_digest)}.bdelta"

    def partial_path(self, raw_digest: str, digest: str) -> Path:
        return self.blob_dir / f"{_hex(raw_digest)}-{_hex(digest)}.zst.incomplete"

    def blob_lock(self, raw_digest: str) -> FileLock:
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(self.blob_dir / f"{_hex(raw_digest)}.lock")

    def cached_blob(self, raw_digest: str, raw_size: int) -> Path | None:
        """The cached delta if it is present, of the recorded size and digest; None otherwise.

        Every hit is re-hashed (about 0.1 s per 200 MB), so a delta corrupted on disk is caught
        before anything loads it; a corrupt copy is removed so the caller downloads it again.
        """
        path = self.blob_path(raw_digest)
        try:
            if path.stat().st_size != raw_size:
                return None
        except FileNotFoundError:
            return None
        if sha256_file(path) != raw_digest:
            self.corrupt_found.append(str(path))
            path.unlink(missing_ok=True)
            return None
        return path

    # --- versions --------------------------------------------------------------------------
    def _version_dir(self, registry: str, repository: str) -> Path:
        namespace, name = repository.split("/")
        return self.repo_dir / registry_dir_name(registry) / namespace / name

    def record_version(self, registry: str, version: dict) -> Path:
        """Remember a pulled version and link it to its blob; returns the link."""
        folder = self._version_dir(registry, version["repository"])
        folder.mkdir(parents=True, exist_ok=True)
        number = int(version["number"])
        record = {
            key: version.get(key)
            for key in ("repository", "number", "digest", "size", "raw_digest", "raw_size", "codec", "tags")
        }
        record["registry"] = registry
        _write_json(folder / f"{number}.json", record)
        link = folder / f"{number}.bdelta"
        target = os.path.relpath(self.blob_path(version["raw_digest"]), folder)
        if not (link.is_symlink() and os.readlink(link) == target):
            tmp = folder / f".{number}.bdelta.{os.getpid()}.incomplete"
            tmp.unlink(missing_ok=True)
            try:
                os.symlink(target, tmp)
            except OSError:
                return self.blob_path(version["raw_digest"])  # no symlinks here: the blob itself is the path
            os.replace(tmp, link)
        return link

    def recorded_version(
        self, registry: str, repository: str, *, number: int | None = None, digest: str | None = None
    ) -> dict | None:
        """The record of a version pulled before from `registry` (by number, or by the digest of
        its stored bytes), or None: what a pinned reference resolves to without the registry."""
        folder = self._version_dir(registry, repository)
        paths = [folder / f"{number}.json"] if number is not None else sorted(folder.glob("*.json"))
        for path in paths:
            record = _read_json(path)
            if (
                record
                and record.get("repository") == repository
                and (digest is None or record.get("digest") == digest)
            ):
                return record
        return None

    def touch(self, registry: str, repository: str, number: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._version_dir(registry, repository) / f"{number}.json")

    def entries(self) -> list[CacheEntry]:
        out = []
        for record_path in sorted(self.repo_dir.glob("*/*/*/*.json")):
            record = _read_json(record_path)
            if record is None or not str(record_path.stem).isdigit():
                continue
            try:
                blob = self.blob_path(record["raw_digest"])
                size = blob.stat().st_size if blob.exists() else -1
                out.append(
                    CacheEntry(
                        registry=record["registry"],
                        repository=record["repository"],
                        number=int(record["number"]),
                        digest=record["digest"],
                        raw_digest=record["raw_digest"],
                        raw_size=int(record["raw_size"]),
                        codec=record.get("codec"),
                        path=record_path.with_suffix(".bdelta"),
                        blob=blob,
                        present=size == int(record["raw_size"]),
                        last_used=dt.datetime.fromtimestamp(record_path.stat().st_mtime, dt.timezone.utc),
                    )
                )
            except (KeyError, TypeError, ValueError, CacheError, FileNotFoundError):
                continue  # a record from elsewhere or half-written: prune removes it
        out.sort(key=lambda e: (e.registry, e.repository, e.number))
        return out

    def blobs(self) -> list[Path]:
        return sorted(p for p in self.blob_dir.glob("*.bdelta") if _BLOB_NAME.fullmatch(p.name))

    # --- verify / prune --------------------------------------------------------------------
    def verify(self, *, remove_corrupt: bool = True) -> VerifyReport:
        """Re-hash every cached delta against the digest it is named by. Corrupt ones are
        removed (unless told not to), so the next pull downloads them again."""
        report = VerifyReport()
        refs: dict[str, list[str]] = {}
        for entry in self.entries():
            refs.setdefault(entry.blob.name, []).append(entry.ref)
            if not entry.blob.exists():
                report.missing.append(entry.ref)
        for blob in self.blobs():
            expected = "sha256:" + blob.name.removesuffix(".bdelta")
            with self.blob_lock(expected):
                try:
                    actual = sha256_file(blob)
                    size = blob.stat().st_size
                except FileNotFoundError:
                    continue
                report.checked += 1
                report.bytes += size
                if actual != expected:
                    if remove_corrupt:
                        blob.unlink(missing_ok=True)
                    report.corrupt.append(
                        {
                            "path": str(blob),
                            "expected": expected,
                            "actual": actual,
                            "refs": refs.get(blob.name, []),
                            "removed": remove_corrupt,
                        }
                    )
        return report

    def prune(self, *, older_than_days: float | None = None, dry_run: bool = False) -> PruneReport:
        """Remove partial downloads, abandoned push state, versions not used for `older_than_days`
        (when given) and blobs no remaining version links to. Anything a running command has
        locked is left alone."""
        report = PruneReport(dry_run=dry_run)

        def remove(kind: str, path: Path) -> None:
            with contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size if not path.is_symlink() else 0
                report.removed.append({"kind": kind, "path": str(path), "bytes": size})
                if not dry_run:
                    path.unlink()

        cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
        kept_blobs: set[str] = set()
        for entry in self.entries():
            record = entry.path.with_suffix(".json")
            if cutoff is not None and entry.last_used.timestamp() < cutoff:
                remove("version", record)
                remove("link", entry.path)
            else:
                kept_blobs.add(entry.blob.name)
        for blob in self.blobs():
            if blob.name not in kept_blobs and not self._locked(self.blob_lock("sha256:" + blob.name[:64])):
                remove("blob", blob)
        for partial in self.blob_dir.glob("*.incomplete"):
            # `<raw>-<stored>.zst.incomplete` (a partial download) or `.<raw>.bdelta.*.incomplete`
            # (a decompression cut short): both start with the blob's digest.
            if not self._locked(self.blob_lock("sha256:" + partial.name.lstrip(".")[:64])):
                remove("partial download", partial)
        for state in self.upload_dir.glob("*.json"):
            lock = FileLock(self.upload_dir / f"{state.stem}.lock")
            if not self._locked(lock):
                remove("push state", self.upload_dir / f"{state.stem}.zst")  # staged by older clients
                remove("push state", state)
        return report

    @staticmethod
    def _locked(lock: FileLock) -> bool:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release()
        return False

    # --- pushes ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def push_state(self, path: Path) -> Iterator[PushState]:
        """The state of pushing the file at `path` as it is now (a changed file is a new push)."""
        st = os.stat(path)
        identity = [
            str(Path(path).resolve()),
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        ]
        key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(self.upload_dir / f"{key}.lock"):
            yield PushState(self.upload_dir, key, identity)


class PushState:
    """What a push of one file keeps between runs: the digests of its storage form (kept after
    the push, so pushing the same bytes again can ask the registry whether it holds them before
    sending anything), and the pending upload per registry repository with the digests it was
    declared with, if any (so a re-run resumes it; zstd at fixed parameters makes the same parts
    again, so only those the store lacks are sent)."""

    def __init__(self, folder: Path, key: str, identity: list):
        self.state_path = folder / f"{key}.json"
        data = _read_json(self.state_path) or {}
        if data.get("identity") != identity or not isinstance(data.get("uploads"), dict):
            data = {"identity": identity, "uploads": {}}
        self._data = data

    @property
    def blob(self) -> BlobInfo | None:
        b = self._data.get("blob")
        return BlobInfo(b["digest"], b["size"], b["raw_digest"], b["raw_size"]) if b else None

    def remember_blob(self, info: BlobInfo) -> None:
        if self.blob != info:
            self._data["blob"] = asdict(info)
            self._save()

    def upload_id(self, target: str) -> str | None:
        entry = self._data["uploads"].get(target)
        return entry["id"] if isinstance(entry, dict) else None

    def upload_declared(self, target: str) -> BlobInfo | None:
        """The digests the pending upload to `target` was declared with (None: streamed)."""
        entry = self._data["uploads"].get(target)
        b = entry.get("declared") if isinstance(entry, dict) else None
        return BlobInfo(b["digest"], b["size"], b["raw_digest"], b["raw_size"]) if b else None

    def remember_upload(self, target: str, upload_id: str, declared: BlobInfo | None) -> None:
        self._data["uploads"][target] = {"id": upload_id, "declared": asdict(declared) if declared else None}
        self._save()

    def forget_upload(self, target: str) -> None:
        if self._data["uploads"].pop(target, None) is not None:
            self._save()

    def finish(self, target: str) -> None:
        """The push is complete: drop its upload."""
        self.forget_upload(target)

    def _save(self) -> None:
        _write_json(self.state_path, self._data)
