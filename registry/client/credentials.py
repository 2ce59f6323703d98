"""Saved logins: `DELTACTL_HOME/tokens.json` (mode 0600) maps registry URLs to tokens, and
`DELTACTL_HOME/config.json` names the default registry. Environment variables win over both.

    registry = resolve_registry(None)      # DELTACTL_REGISTRY > saved default > http://127.0.0.1:8000
    token = resolve_token(registry, None)  # DELTACTL_TOKEN > token saved for that registry > None
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

from codec.files import write_atomic
from registry.client import settings
from registry.common.errors import InvalidRequestError

TOKENS_FILE = "tokens.json"
CONFIG_FILE = "config.json"


def normalize_url(url: str) -> str:
    """`http://host:8000/` -> `http://host:8000`; refuses anything but http(s) URLs."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequestError(f"registry URL {url!r} must look like http://host:port or https://host")
    return url


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # an unreadable file counts as no saved login; the next login rewrites it
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict, *, mode: int) -> None:
    """Write atomically, created with `mode` from the start (a token is never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True).encode(), mode=mode)


def saved_registry(home: Path | None = None) -> str | None:
    value = _read_json((home or settings.deltactl_home()) / CONFIG_FILE).get("registry")
    return value if isinstance(value, str) else None


def saved_token(registry: str, home: Path | None = None) -> str | None:
    value = _read_json((home or settings.deltactl_home()) / TOKENS_FILE).get(normalize_url(registry))
    return value if isinstance(value, str) else None


def resolve_registry(
    explicit: str | None, home: Path | None = None, *, env: settings.ClientSettings | None = None
) -> str:
    env = env or settings.load()
    return normalize_url(explicit or env.registry or saved_registry(home) or settings.DEFAULT_REGISTRY)


def resolve_token(
    registry: str,
    explicit: str | None,
    home: Path | None = None,
    *,
    env: settings.ClientSettings | None = None,
) -> str | None:
    env = env or settings.load()
    return explicit or env.token or saved_token(registry, home)


def save_login(registry: str, token: str | None, home: Path | None = None) -> Path:
    """Remember `token` for `registry` (None: the registry needs none) and make it the default."""
    home = home or settings.deltactl_home()
    registry = normalize_url(registry)
    tokens = _read_json(home / TOKENS_FILE)
    if token:
        tokens[registry] = token
    else:
        tokens.pop(registry, None)
    _write_json(home / TOKENS_FILE, tokens, mode=0o600)
    config = _read_json(home / CONFIG_FILE)
    config["registry"] = registry
    _write_json(home / CONFIG_FILE, config, mode=0o644)
    return home / TOKENS_FILE


def forget_login(registry: str, home: Path | None = None) -> bool:
    """Drop the saved token of `registry`; True if there was one."""
    home = home or settings.deltactl_home()
    registry = normalize_url(registry)
    tokens = _read_json(home / TOKENS_FILE)
    had = tokens.pop(registry, None) is not None
    if had:
        _write_json(home / TOKENS_FILE, tokens, mode=0o600)
    config = _read_json(home / CONFIG_FILE)
    if config.get("registry") == registry:
        config.pop("registry")
        _write_json(home / CONFIG_FILE, config, mode=0o644)
    return had
