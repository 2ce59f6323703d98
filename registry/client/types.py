"""What the registry's API answers with, as the client's frozen dataclasses (fields this client
does not know, from a newer server, are ignored), the results of push and pull, and the
`Progress` protocol a caller watches transfers with. Nothing here imports the server."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from codec.storage import BlobInfo


def build(cls, data: dict):
    """A dataclass from an API body, ignoring fields this client does not know (newer servers)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = data[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = None
    return cls(**kwargs)


class _Info:
    def as_dict(self) -> dict:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class BaseInfo(_Info):
    name: str
    fingerprint: str
    architecture: str | None = None
    parameter_count: int | None = None
    config: dict | None = None
    created_by: str | None = None
    created_at: str | None = None


@dataclass(frozen=True)
class LatestInfo(_Info):
    number: int
    digest: str
    size: int
    raw_size: int
    codec: str | None = None
    size_ratio: float | None = None
    ready_at: str | None = None


@dataclass(frozen=True)
class RepoInfo(_Info):
    full_name: str
    namespace: str
    name: str
    base: str
    base_fingerprint: str
    description: str = ""
    visibility: str = "public"
    latest_version: int | None = None
    latest: LatestInfo | None = None
    created_by: str | None = None
    created_at: str | None = None

    @classmethod
    def from_api(cls, data: dict) -> RepoInfo:
        latest = data.get("latest")
        return build(cls, {**data, "latest": build(LatestInfo, latest) if latest else None})


@dataclass(frozen=True)
class VersionInfo(_Info):
    repository: str
    number: int
    digest: str
    size: int
    raw_digest: str
    raw_size: int
    tags: list[str] = field(default_factory=list)
    codec: str | None = None
    dtype: str | None = None
    bits: int | None = None
    size_ratio: float | None = None
    fidelity: dict | None = None
    metadata: dict | None = None
    description: str = ""
    created_by: str | None = None
    created_at: str | None = None
    ready_at: str | None = None
    download_url: str | None = None

    @property
    def blob(self) -> BlobInfo:
        return BlobInfo(self.digest, self.size, self.raw_digest, self.raw_size)

    @property
    def calibration(self) -> dict | None:
        return json_dict((self.metadata or {}).get("calibration"))


@dataclass(frozen=True)
class TagInfo(_Info):
    name: str
    version: int
    updated_by: str | None = None
    updated_at: str | None = None


@dataclass(frozen=True)
class PushResult(_Info):
    version: VersionInfo
    deduplicated: bool  # the registry already held these bytes: none were sent
    sent_bytes: int
    resumed: bool  # an interrupted upload of this file was continued
    skipped_parts: int  # parts already in the store that were not sent again
    created_repo: bool
    tags: list[str]
    seconds: float
    #: An earlier run of this push was published but lost the answer: this is its version.
    already_published: bool = False
    #: This run published the bytes an interrupted earlier run had sent (nothing left to send).
    completed_earlier_upload: bool = False


@dataclass(frozen=True)
class PullResult(_Info):
    version: VersionInfo
    path: Path  # the cached delta (a link to its blob), or the output file when one was asked for
    blob: Path
    cache_hit: bool
    downloaded_bytes: int
    seconds: float
    repaired: bool = False  # the cached copy failed its digest check and was downloaded again
    offline: bool = False  # served from the cache without the registry (offline, or the registry was down)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(path=str(self.path), blob=str(self.blob))
        return out


class Progress(Protocol):
    """How a caller watches a transfer (the CLI draws bars); every method may be a no-op."""

    def start(self, phase: str, total: int | None, completed: int = 0) -> None: ...

    def advance(self, n: int) -> None: ...

    def stop(self) -> None: ...


class Silent:
    def start(self, phase: str, total: int | None, completed: int = 0) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass


def json_dict(value: Any) -> dict | None:
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None
