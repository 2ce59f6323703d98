"""The registry client's settings, read from the environment when used (the server's own
settings are `registry.settings`). Nothing here imports the server.

    DELTACTL_HOME      cache, saved logins and push state ($XDG_CACHE_HOME/deltastore or ~/.cache/deltastore)
    DELTACTL_REGISTRY  registry URL (else the one `deltactl login` saved, else DEFAULT_REGISTRY)
    DELTACTL_TOKEN     API token (else the one `deltactl login` saved for that registry)
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "DELTACTL_HOME"
ENV_REGISTRY = "DELTACTL_REGISTRY"
ENV_TOKEN = "DELTACTL_TOKEN"
ENV_UPLOAD_CONCURRENCY = "DELTACTL_UPLOAD_CONCURRENCY"

#: Where `deltactl serve` listens by default.
DEFAULT_REGISTRY = "http://127.0.0.1:8000"
#: Parallel part uploads (boto3's default concurrency is 10).
DEFAULT_UPLOAD_CONCURRENCY = 10
#: Read/write unit of transfers and hashing.
CHUNK = 1 << 20
#: Seconds to wait for a connection / for the next bytes of an answer.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 120.0
#: Attempts per part upload and per download before the command gives up (a re-run resumes).
TRANSFER_ATTEMPTS = 3


def deltactl_home() -> Path:
    explicit = os.environ.get(ENV_HOME)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "deltastore"


def env_registry() -> str | None:
    return os.environ.get(ENV_REGISTRY) or None


def env_token() -> str | None:
    return os.environ.get(ENV_TOKEN) or None


def upload_concurrency() -> int:
    value = os.environ.get(ENV_UPLOAD_CONCURRENCY, "")
    return max(1, int(value)) if value.isdigit() else DEFAULT_UPLOAD_CONCURRENCY
