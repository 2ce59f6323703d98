"""The registry client's settings, read from the environment when used (the server's own
settings are `registry.settings`). Nothing here imports the server.

    DELTACTL_HOME      cache, saved logins and push state ($XDG_CACHE_HOME/deltastore or ~/.cache/deltastore)
    DELTACTL_REGISTRY  registry URL (else the one `deltactl login` saved, else DEFAULT_REGISTRY)
    DELTACTL_TOKEN     API token (else the one `deltactl login` saved for that registry)
    DELTACTL_UNAVAILABLE_MAX_WAIT  seconds a read may wait out 503s with Retry-After (0: never)
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "DELTACTL_HOME"
ENV_REGISTRY = "DELTACTL_REGISTRY"
ENV_TOKEN = "DELTACTL_TOKEN"
ENV_UPLOAD_CONCURRENCY = "DELTACTL_UPLOAD_CONCURRENCY"
ENV_UNAVAILABLE_MAX_WAIT = "DELTACTL_UNAVAILABLE_MAX_WAIT"

#: Where `deltactl serve` listens by default.
DEFAULT_REGISTRY = "http://127.0.0.1:8000"
#: Parallel part uploads (boto3's default concurrency is 10).
DEFAULT_UPLOAD_CONCURRENCY = 10
#: Seconds to wait for a connection / for the next bytes of an answer.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 120.0
#: Attempts per part upload and per download before the command gives up (a re-run resumes).
TRANSFER_ATTEMPTS = 3
#: An idempotent request (GET: list, show, pull's metadata, downloads) answered 503 with a
#: Retry-After header is sent again after that wait: at most this many tries in all, and only
#: while the waits add up to at most UNAVAILABLE_MAX_WAIT seconds. Other requests never are.
UNAVAILABLE_ATTEMPTS = 3
UNAVAILABLE_MAX_WAIT = 10.0


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


def unavailable_max_wait() -> float:
    """DELTACTL_UNAVAILABLE_MAX_WAIT (seconds, 0 turns the retries off), else UNAVAILABLE_MAX_WAIT."""
    value = os.environ.get(ENV_UNAVAILABLE_MAX_WAIT, "").strip()
    try:
        return max(0.0, float(value)) if value else UNAVAILABLE_MAX_WAIT
    except ValueError:
        return UNAVAILABLE_MAX_WAIT
