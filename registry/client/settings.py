"""The registry client's settings: one pydantic-settings object read from `DELTACTL_*` (bad values
are refused with the variable's name), and the fixed constants of its transfers.

    DELTACTL_HOME                  cache, saved logins, push state
                                   ($XDG_CACHE_HOME/deltastore or ~/.cache/deltastore)
    DELTACTL_REGISTRY              registry URL (else the one `deltactl login` saved, else DEFAULT_REGISTRY)
    DELTACTL_TOKEN                 API token (else the one `deltactl login` saved for that registry)
    DELTACTL_UPLOAD_CONCURRENCY    parts uploaded in parallel (1-256)
    DELTACTL_UNAVAILABLE_MAX_WAIT  seconds a read may wait out 503s with Retry-After (0: never)
    DELTACTL_OFFLINE               1: never touch the network; serve pinned versions from the cache
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from codec.errors import DeltaStoreError

ENV_PREFIX = "DELTACTL_"
#: Where `deltactl serve` listens by default.
DEFAULT_REGISTRY = "http://127.0.0.1:8000"
#: Seconds to wait for a connection / for the next bytes of an answer.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 120.0
#: Attempts per part upload and per download before the command gives up (a re-run resumes).
TRANSFER_ATTEMPTS = 3
#: An idempotent request (GET: list, show, pull's metadata, downloads) answered 503 with a
#: Retry-After header is sent again after that wait: at most this many tries in all, and only
#: while the waits add up to at most `unavailable_max_wait` seconds. Other requests never are.
UNAVAILABLE_ATTEMPTS = 3


class SettingsError(DeltaStoreError, ValueError):
    """A `DELTACTL_*` variable holds a value the client cannot use."""


class ClientSettings(BaseSettings):
    """What the environment says; `RegistryApi` arguments override each field."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore")

    home: Path | None = None
    registry: str | None = None
    token: str | None = None
    upload_concurrency: int = Field(10, ge=1, le=256)  # boto3's default concurrency is 10
    unavailable_max_wait: float = Field(10.0, ge=0, allow_inf_nan=False)
    offline: bool = False

    @property
    def cache_home(self) -> Path:
        if self.home is not None:
            return self.home.expanduser()
        xdg = os.environ.get("XDG_CACHE_HOME")
        return (Path(xdg) if xdg else Path.home() / ".cache") / "deltastore"


def load() -> ClientSettings:
    """The settings as the environment has them now; a bad value raises SettingsError naming the
    variable, the value and what it must be."""
    try:
        return ClientSettings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ENV_PREFIX + "_".join(str(part) for part in error["loc"]).upper()
            problems.append(f"{name}={os.environ.get(name, error.get('input'))!r}: {error['msg']}")
        raise SettingsError("; ".join(problems)) from None


def deltactl_home() -> Path:
    return load().cache_home
