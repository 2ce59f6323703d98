"""`RegistryApi`, the one class `deltactl` calls: the registry's `/v1` endpoints as methods, and
push and pull (registry.client.push / .pull) over one HTTP layer (registry.client.http), the
local cache and the saved login. It imports nothing of the server.

    api = RegistryApi()                          # DELTACTL_REGISTRY / DELTACTL_TOKEN / saved login
    pushed = api.push("math.bdelta", "acme/math", tags=["prod"])
    pulled = api.pull("acme/math:prod")          # a second pull is a cache hit: no blob bytes move
    print(pulled.version.number, pulled.path)
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from codec.errors import BaseMismatchError
from registry.client import credentials, settings
from registry.client import pull as pulling
from registry.client import push as pushing
from registry.client.cache import DeltaCache
from registry.client.errors import NetworkError, OfflineError
from registry.client.http import RegistryHttp
from registry.client.push import settable_tag
from registry.client.refs import Ref, parse_ref
from registry.client.types import (
    BaseInfo,
    Progress,
    PullResult,
    PushResult,
    RepoInfo,
    Silent,
    TagInfo,
    VersionInfo,
    build,
)
from registry.common import names
from registry.common.errors import AuthenticationError, DatabaseUnavailableError, NotFoundError


def checkpoint_record(path: str | os.PathLike[str]) -> dict:
    """What the registry records of a base from its local checkpoint: fingerprint, architecture,
    parameter count and config (reads every weight once, for the fingerprint)."""
    from codec.checkpoint import Checkpoint  # torch: only when a base is registered

    ckpt = Checkpoint.open(path)
    config = ckpt.config if isinstance(ckpt.config, dict) else None
    architecture = None
    if config:
        archs = config.get("architectures")
        architecture = archs[0] if isinstance(archs, list) and archs else config.get("model_type")
    return {
        "fingerprint": ckpt.fingerprint(),
        "architecture": architecture,
        "parameter_count": sum(math.prod(ckpt.entry(n).shape) for n in ckpt.names),
        "config": config,
    }


class RegistryApi:
    """Everything `deltactl` does with a registry. Registry URL, token, upload concurrency and
    the 503 budget default to the environment (`registry.client.settings`) and the saved login
    (`registry.client.credentials`); the cache lives in DELTACTL_HOME."""

    def __init__(
        self,
        endpoint: str | None = None,
        token: str | None = None,
        *,
        home: str | os.PathLike[str] | None = None,
        upload_concurrency: int | None = None,
        unavailable_max_wait: float | None = None,
        offline: bool | None = None,
    ):
        env = settings.load()
        self.home = Path(home) if home is not None else env.cache_home
        self.endpoint = credentials.resolve_registry(endpoint, self.home, env=env)
        self.token = credentials.resolve_token(self.endpoint, token, self.home, env=env)
        self.cache = DeltaCache(self.home)
        self.upload_concurrency = upload_concurrency or env.upload_concurrency
        #: Seconds an idempotent request may spend waiting out 503s with Retry-After (0: no retries).
        self.unavailable_max_wait = (
            env.unavailable_max_wait if unavailable_max_wait is None else max(0.0, unavailable_max_wait)
        )
        #: Never touch the network: pinned versions come from the cache, everything else fails.
        self.offline = env.offline if offline is None else offline
        self.http = RegistryHttp(
            self.endpoint,
            self.token,
            upload_concurrency=self.upload_concurrency,
            unavailable_max_wait=self.unavailable_max_wait,
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RegistryApi:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- HTTP ------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        if self.offline:
            raise OfflineError(
                f"{method} {path} needs the registry at {self.endpoint}, and the client is offline "
                "(DELTACTL_OFFLINE)"
            )
        return self.http.request(method, path, **kwargs)

    def _pages(self, path: str, params: dict | None = None) -> Iterator[dict]:
        params = dict(params or {}, limit=200)
        while True:
            page = self._request("GET", path, params=params).json()
            yield from page["items"]
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    # --- identity --------------------------------------------------------------------------
    def whoami(self) -> dict:
        return self._request("GET", "/v1/whoami").json()

    def login(self, token: str | None) -> dict:
        """Check `token` against the registry, then save it (mode 0600) and make this registry
        the default. Returns `whoami`. A wrong token raises AuthenticationError and saves nothing."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        who = self._request("GET", "/v1/whoami", headers=headers).json()
        if who.get("auth_enabled") and not who.get("authenticated"):
            raise AuthenticationError(
                f"{self.endpoint} needs a token" if not token else "the registry did not accept this token"
            )
        credentials.save_login(self.endpoint, token, self.home)
        return who

    def logout(self) -> bool:
        return credentials.forget_login(self.endpoint, self.home)

    # --- bases -----------------------------------------------------------------------------
    def bases(self) -> list[BaseInfo]:
        return [build(BaseInfo, b) for b in self._pages("/v1/bases")]

    def base(self, name: str) -> BaseInfo:
        return build(BaseInfo, self._request("GET", f"/v1/bases/{names.parse_base_name(name)}").json())

    def register_base(
        self,
        name: str,
        fingerprint: str,
        *,
        architecture: str | None = None,
        parameter_count: int | None = None,
        config: dict | None = None,
    ) -> tuple[BaseInfo, bool]:
        """Register a base model; returns it and whether it was new (the same name and fingerprint
        again is a no-op)."""
        body = {
            "name": names.parse_base_name(name),
            "fingerprint": fingerprint,
            "architecture": architecture,
            "parameter_count": parameter_count,
            "config": config,
        }
        r = self._request("POST", "/v1/bases", json=body)
        return build(BaseInfo, r.json()), r.status_code == 201

    def delete_base(self, name: str) -> None:
        """Remove a registered base that no repository uses (ConflictError while one does)."""
        self._request("DELETE", f"/v1/bases/{names.parse_base_name(name)}")

    def register_base_from_checkpoint(
        self, name: str, path: str | os.PathLike[str], *, expected_fingerprint: str | None = None
    ) -> tuple[BaseInfo, bool]:
        """Register the local checkpoint at `path` (HF directory or .safetensors) as base `name`:
        its fingerprint, architecture and parameter count are computed here. A delta, or a file
        without model weights, is refused; with `expected_fingerprint` (a delta's), a checkpoint
        of other weights raises BaseMismatchError and nothing is registered."""
        names.parse_base_name(name)
        record = checkpoint_record(path)
        if expected_fingerprint is not None and record["fingerprint"] != expected_fingerprint:
            raise BaseMismatchError(
                f"{path} is not the base this delta was made for: its weights have fingerprint "
                f"{record['fingerprint']}, the delta's base has {expected_fingerprint}; "
                "nothing was registered",
                expected=expected_fingerprint,
                actual=record["fingerprint"],
            )
        return self.register_base(name, **record)

    # --- repositories and versions ---------------------------------------------------------
    def repos(
        self, *, base: str | None = None, namespace: str | None = None, query: str | None = None
    ) -> list[RepoInfo]:
        params = {k: v for k, v in (("base", base), ("namespace", namespace), ("q", query)) if v}
        return [RepoInfo.from_api(r) for r in self._pages("/v1/repos", params)]

    def repo(self, repo: str) -> RepoInfo:
        namespace, name = names.parse_repo_name(repo)
        return RepoInfo.from_api(self._request("GET", f"/v1/repos/{namespace}/{name}").json())

    def create_repo(
        self, repo: str, *, base: str, description: str = "", visibility: str = "public"
    ) -> RepoInfo:
        namespace, name = names.parse_repo_name(repo)
        body = {
            "namespace": namespace,
            "name": name,
            "base": base,
            "description": description,
            "visibility": visibility,
        }
        return RepoInfo.from_api(self._request("POST", "/v1/repos", json=body).json())

    def delete_repo(self, repo: str) -> None:
        namespace, name = names.parse_repo_name(repo)
        self._request("DELETE", f"/v1/repos/{namespace}/{name}")

    def versions(self, repo: str) -> list[VersionInfo]:
        namespace, name = names.parse_repo_name(repo)
        return [build(VersionInfo, v) for v in self._pages(f"/v1/repos/{namespace}/{name}/versions")]

    def version(self, ref: str | Ref) -> VersionInfo:
        """The version `ref` names (a number, a tag, `latest`, or the digest of its stored bytes)."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if ref.digest is not None:
            page = self._request(
                "GET", f"/v1/repos/{ref.repo}/versions", params={"digest": ref.digest}
            ).json()
            if not page["items"]:
                raise NotFoundError(f"{ref.repo} has no version with digest {ref.digest}")
            return build(VersionInfo, page["items"][0])
        return build(VersionInfo, self._request("GET", f"/v1/repos/{ref.repo}/versions/{ref.api_ref}").json())

    def delete_version(self, repo: str, number: int) -> list[str]:
        """Delete version `number`; returns the tags that pointed at it, which went with it."""
        namespace, name = names.parse_repo_name(repo)
        r = self._request("DELETE", f"/v1/repos/{namespace}/{name}/versions/{number}")
        return r.json()["removed_tags"] if r.status_code == 200 else []  # 204: a registry that does not say

    def tags(self, repo: str) -> list[TagInfo]:
        namespace, name = names.parse_repo_name(repo)
        return [build(TagInfo, t) for t in self._request("GET", f"/v1/repos/{namespace}/{name}/tags").json()]

    def set_tag(self, repo: str, tag: str, version: int) -> TagInfo:
        namespace, name = names.parse_repo_name(repo)
        r = self._request(
            "PUT", f"/v1/repos/{namespace}/{name}/tags/{settable_tag(tag)}", json={"version": version}
        )
        return build(TagInfo, r.json())

    def delete_tag(self, repo: str, tag: str) -> None:
        namespace, name = names.parse_repo_name(repo)
        self._request("DELETE", f"/v1/repos/{namespace}/{name}/tags/{settable_tag(tag)}")

    # --- push and pull ---------------------------------------------------------------------
    def push(
        self,
        path: str | os.PathLike[str],
        repo: str,
        *,
        base: str | None = None,
        base_path: str | os.PathLike[str] | None = None,
        tags: list[str] | tuple[str, ...] = (),
        description: str = "",
        visibility: str = "public",
        progress: Progress | None = None,
    ) -> PushResult:
        """Validate the delta at `path`, make sure the repository exists with the delta's base
        (creating it, and registering the base from `base_path` when asked), upload the storage
        form, publish it as the next version and set `tags`.

        Identical bytes already in the registry are not sent again. An interrupted upload is
        resumed by calling push again with the same file: only the missing parts are sent."""
        if self.offline:
            raise OfflineError(
                f"pushing needs the registry at {self.endpoint}, and the client is offline (DELTACTL_OFFLINE)"
            )
        return pushing.push(
            self,
            path,
            repo,
            base=base,
            base_path=base_path,
            tags=tags,
            description=description,
            visibility=visibility,
            progress=progress,
        )

    def pull(
        self,
        ref: str | Ref,
        *,
        output: str | os.PathLike[str] | None = None,
        progress: Progress | None = None,
    ) -> PullResult:
        """Make `ref` available locally: from the cache when it holds the delta, else downloaded
        (resuming a partial download with Range), verified and decompressed into the cache.
        With `output`, a copy is written there too (a directory, or a path ending in '/', gets
        `<namespace>-<name>-v<N>.bdelta`).

        A pinned reference (`@N`, `@sha256:…`) pulled before is served from the cache when the
        registry cannot be reached, and offline (DELTACTL_OFFLINE) without trying; a tag or
        `latest` can move, so it always needs the registry."""
        started = time.perf_counter()
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if self.offline:
            version, http = self._cached_version(ref), None
        else:
            try:
                version, http = self.version(ref), self.http
            except (NetworkError, DatabaseUnavailableError):
                if not ref.pinned or self._cached_version(ref, missing_ok=True) is None:
                    raise
                version, http = self._cached_version(ref), None  # the registry is down: the cache serves it
        result = pulling.pull(
            http,
            self.cache,
            version,
            registry=self.endpoint,
            output=output,
            progress=progress or Silent(),
            started=started,
        )
        return dataclasses.replace(result, offline=http is None)

    def _cached_version(self, ref: Ref, *, missing_ok: bool = False) -> VersionInfo | None:
        """The version a pinned `ref` names, from the cache's records (no network)."""
        if not ref.pinned:
            raise OfflineError(
                f"{ref} can move (a tag or latest): only a version number or a digest can be served "
                "from the cache without the registry (the client is offline: DELTACTL_OFFLINE)"
            )
        record = self.cache.recorded_version(self.endpoint, ref.repo, number=ref.version, digest=ref.digest)
        if record is None:
            if missing_ok:
                return None
            raise OfflineError(
                f"{ref} was never pulled from {self.endpoint}, and the client is offline (DELTACTL_OFFLINE)"
            )
        return build(VersionInfo, record)
