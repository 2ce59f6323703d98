"""The registry's Python client: `RegistryApi`, the one class `deltactl` calls. HTTP to the `/v1`
API (httpx), bytes straight to and from the blob store's presigned URLs, and the local cache.
It imports nothing of the server: errors the registry answers with are rebuilt as the classes
of `registry.errors` from the `{"error": {"code", "message"}}` body.

    api = RegistryApi()                          # DELTACTL_REGISTRY / DELTACTL_TOKEN / saved login
    pushed = api.push("math.bdelta", "acme/math", tags=["prod"])
    pulled = api.pull("acme/math:prod")          # a second pull is a cache hit: no blob bytes move
    print(pulled.version.number, pulled.path)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import email.utils
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import httpx

from codec import __version__
from codec.errors import BaseMismatchError, DeltaStoreError
from codec.files import CHUNK, AtomicWriter, output_file
from codec.format import DeltaFile
from codec.storage import BlobInfo
from registry.client import credentials, settings
from registry.client.cache import DeltaCache
from registry.client.errors import (
    BlobStoreUnreachableError,
    CorruptDownloadError,
    NetworkError,
    RegistryUnavailableError,
    RegistryUnreachableError,
    TransferInterruptedError,
)
from registry.client.transfer import netloc as _netloc
from registry.client.transfer import put_range, receive_blob, s3_error, upload_parts
from registry.common import names
from registry.common.errors import (
    AuthenticationError,
    BaseMismatchUploadError,
    BlobStoreError,
    ConflictError,
    DatabaseUnavailableError,
    DigestMismatchError,
    InvalidNameError,
    InvalidRequestError,
    InvalidUploadError,
    NotFoundError,
    PermissionDeniedError,
    RegistryError,
    SchemaOutOfDateError,
    StorageFullError,
    UploadTooLargeError,
)

#: The API's error codes (docs/registry.md) and the classes they come back as.
_ERROR_CLASSES: dict[str, type[RegistryError]] = {
    "invalid_request": InvalidRequestError, "invalid_name": InvalidNameError, "unauthenticated": AuthenticationError,
    "forbidden": PermissionDeniedError, "not_found": NotFoundError, "conflict": ConflictError,
    "base_mismatch": BaseMismatchUploadError, "too_large": UploadTooLargeError, "digest_mismatch": DigestMismatchError,
    "invalid_delta": InvalidUploadError, "blob_store_error": BlobStoreError, "schema_out_of_date": SchemaOutOfDateError,
    "database_unavailable": DatabaseUnavailableError, "insufficient_storage": StorageFullError,
}
_STATUS_CLASSES: dict[int, type[RegistryError]] = {
    400: InvalidRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    409: ConflictError, 413: UploadTooLargeError, 422: InvalidRequestError, 507: StorageFullError,
}
#: Statuses a proxy or load balancer in front of the registry answers when the registry is not
#: there to answer (the registry's own 502 and 503 always carry its error body).
_GATEWAY_STATUSES = frozenset({502, 503, 504})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: Requests that may be sent again after a 503 with Retry-After (they change nothing).
_IDEMPOTENT = frozenset({"GET", "HEAD"})
#: Failures after which a request may be sent again: no connection, or one that broke before an
#: answer came (not a timeout: the registry may still be working on the first request).
_CONNECTION_LOST = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


# --- references --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ref:
    """`namespace/name`, `namespace/name:TAG` or `namespace/name@VERSION`."""

    namespace: str
    name: str
    version: int | None = None
    tag: str | None = None

    @property
    def repo(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def api_ref(self) -> str:
        """The `{ref}` of `/versions/{ref}`: the number, the tag, or `latest`."""
        return str(self.version) if self.version is not None else (self.tag or "latest")

    @property
    def explicit(self) -> bool:
        return self.version is not None or self.tag is not None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.repo}@{self.version}"
        return f"{self.repo}:{self.tag}" if self.tag else self.repo


def parse_ref(text: str) -> Ref:
    """`acme/math` (latest), `acme/math:prod`, `acme/math:3` or `acme/math@3` -> Ref."""
    repo, at, number = text.partition("@")
    if at:
        namespace, name = names.parse_repo_name(repo)
        version = names.parse_version_ref(number)
        if not isinstance(version, int):
            raise InvalidNameError(f"{text!r}: a version after '@' is a number (use ':' for a tag)")
        return Ref(namespace, name, version=version)
    repo, colon, ref = text.partition(":")
    namespace, name = names.parse_repo_name(repo)
    if not colon:
        return Ref(namespace, name)
    parsed = names.parse_version_ref(ref)
    return Ref(namespace, name, version=parsed) if isinstance(parsed, int) else Ref(namespace, name, tag=parsed)


# --- what the API returns ------------------------------------------------------------------------
def _build(cls, data: dict):
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
    def from_api(cls, data: dict) -> "RepoInfo":
        latest = data.get("latest")
        return _build(cls, {**data, "latest": _build(LatestInfo, latest) if latest else None})


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
        return _json_dict((self.metadata or {}).get("calibration"))


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
    already_published: bool = False  # an earlier run of this push was published but lost the answer: its version


@dataclass(frozen=True)
class PullResult(_Info):
    version: VersionInfo
    path: Path  # the cached delta (a link to its blob), or the output file when one was asked for
    blob: Path
    cache_hit: bool
    downloaded_bytes: int
    seconds: float
    repaired: bool = False  # the cached copy failed its digest check and was downloaded again

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(path=str(self.path), blob=str(self.blob))
        return out


class Progress(Protocol):
    """How a caller watches a transfer (the CLI draws bars); every method may be a no-op."""

    def start(self, phase: str, total: int | None, completed: int = 0) -> None: ...

    def advance(self, n: int) -> None: ...

    def stop(self) -> None: ...


class _Silent:
    def start(self, phase: str, total: int | None, completed: int = 0) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass


def _json_dict(value: Any) -> dict | None:
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def api_error(response: httpx.Response) -> DeltaStoreError:
    """The registry's error answer as the exception class it was raised as on the server; a 502,
    503 or 504 without the registry's error body (a proxy's page) as RegistryUnavailableError."""
    code, message = None, None
    try:
        body = response.json()
        code, message = body["error"]["code"], body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    if not isinstance(code, str) or not isinstance(message, str):
        code, message = None, None
        if response.status_code in _GATEWAY_STATUSES:
            return _unavailable(response)
    cls = _ERROR_CLASSES.get(code or "") or _STATUS_CLASSES.get(response.status_code, RegistryError)
    message = message or f"HTTP {response.status_code} from {response.request.method} {response.request.url.path}"
    if cls is AuthenticationError:
        message += " (log in with `deltactl login`, or set DELTACTL_TOKEN)"
    elif cls is DatabaseUnavailableError:
        retry = response.headers.get("retry-after", "")
        message = (f"the registry at {_origin(response)} cannot use its database right now: {message.rstrip('.')}. "
                   f"Nothing was changed and nothing already stored is lost; retry {f'in {retry} s' if retry.isdigit() else 'shortly'}")
    elif cls is SchemaOutOfDateError:
        fix = "done so" if _SCHEMA_FIX in message else f"run `{_SCHEMA_FIX}` on its database"
        message = (f"the registry at {_origin(response)} cannot serve requests until its database schema is "
                   f"upgraded: {message.rstrip('.')}. Nothing was changed; retrying fails the same way until the "
                   f"registry's operator has {fix}")
    elif cls is StorageFullError:
        message = (f"the registry at {_origin(response)} is out of storage: {message.rstrip('.')}. Nothing already "
                   "stored is lost; retry once space has been freed there (re-running a push resumes it)")
    error = cls(message)
    if cls is RegistryError:
        error.status = response.status_code
    return error


_SCHEMA_FIX = "deltactl db upgrade"


def _unavailable(response: httpx.Response) -> RegistryUnavailableError:
    request = response.request
    retry = _retry_after(response)
    when = f"retry in {math.ceil(retry)} s" if retry is not None else "retry shortly"
    error = RegistryUnavailableError(
        f"the registry at {_origin(response)} is unavailable: {request.method} {request.url.copy_with(query=None)} "
        f"answered HTTP {response.status_code} {response.reason_phrase} without the registry's error body (a proxy "
        f"or load balancer in front of the registry answered for it); {when}"
    )
    error.status = response.status_code
    return error


def _retry_after(response: httpx.Response) -> float | None:
    """The seconds a `Retry-After` header asks to wait (a number of seconds or an HTTP date); None
    without a usable one."""
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return float(value)
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())


# --- the client ----------------------------------------------------------------------------------
class RegistryApi:
    """Everything `deltactl` does with a registry. Registry URL and token default to the
    environment and the saved login (`registry.credentials`); the cache lives in DELTACTL_HOME."""

    def __init__(
        self, endpoint: str | None = None, token: str | None = None, *, home: str | os.PathLike[str] | None = None,
        upload_concurrency: int | None = None, unavailable_max_wait: float | None = None,
    ):
        self.home = Path(home) if home is not None else settings.deltactl_home()
        self.endpoint = credentials.resolve_registry(endpoint, self.home)
        self.token = credentials.resolve_token(self.endpoint, token, self.home)
        self.cache = DeltaCache(self.home)
        self.upload_concurrency = upload_concurrency or settings.upload_concurrency()
        #: Seconds an idempotent request may spend waiting out 503s with Retry-After (0: no retries).
        self.unavailable_max_wait = (settings.unavailable_max_wait() if unavailable_max_wait is None
                                     else max(0.0, unavailable_max_wait))
        timeout = httpx.Timeout(settings.READ_TIMEOUT, connect=settings.CONNECT_TIMEOUT)
        headers = {"User-Agent": f"deltactl/{__version__}"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._http = httpx.Client(base_url=self.endpoint, headers=headers, timeout=timeout)
        # Presigned blob-store URLs carry their own signature: this client never sends the token.
        pool = self.upload_concurrency + 2
        self._blob_http = httpx.Client(timeout=timeout, headers={"User-Agent": headers["User-Agent"]},
                                       limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool))

    def close(self) -> None:
        self._http.close()
        self._blob_http.close()

    def __enter__(self) -> "RegistryApi":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- HTTP ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _network(self, what: str) -> Iterator[None]:
        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise RegistryUnreachableError(
                f"cannot reach the registry at {self.endpoint} ({_reason(exc)}); is it running? "
                "(set DELTACTL_REGISTRY or `deltactl login --registry URL`)"
            ) from None
        except httpx.TimeoutException:
            raise NetworkError(f"the registry at {self.endpoint} did not answer {what} in time") from None
        except httpx.TransportError as exc:
            raise NetworkError(f"{what} at {self.endpoint} failed: {_reason(exc)}") from None

    @contextlib.contextmanager
    def _blob_store_network(self, url: str, what: str, *, upload: bool = False) -> Iterator[None]:
        """Like `_network`, for a request to the blob store a presigned URL points at: failures
        name the store's host, not the registry (which answered)."""
        try:
            yield
        except httpx.TransportError as exc:
            raise self._blob_store_error(exc, _netloc(url), what, upload=upload) from None

    def _blob_store_error(
        self, exc: httpx.TransportError, store: str, what: str, *, upload: bool = False, brief: bool = False
    ) -> NetworkError:
        """A failed request to the blob store at `store` (`host:port`) as the client's error, saying
        it is the blob store; `brief` leaves out what to do (the caller says it)."""
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            message = f"cannot reach the blob store at {store} ({_reason(exc)}) for {what}"
            if not brief:
                message += (f"; the registry at {self.endpoint} answered, but the store it points to did not: retry when "
                            "the store is reachable again" + (" (running the same push again resumes it)" if upload else ""))
            return BlobStoreUnreachableError(message)
        if isinstance(exc, httpx.TimeoutException):
            return NetworkError(f"the blob store at {store} did not answer {what} in time")
        return NetworkError(f"{what} {'to' if upload else 'from'} the blob store at {store} failed: {_reason(exc)}")

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        with self._network(f"{method} {path}"):
            response = self._waiting_out_503(method, lambda: self._http.request(method, path, **kwargs))
        if response.is_error:
            raise api_error(response)
        return response

    def _waiting_out_503(self, method: str, send: Callable[[], httpx.Response]) -> httpx.Response:
        """`send()`, sent again while it answers 503 with a Retry-After the budget allows, when
        `method` is idempotent (GET, HEAD): at most UNAVAILABLE_ATTEMPTS tries, at most
        `unavailable_max_wait` seconds of waiting in all. Any other request is sent once."""
        waited, attempt = 0.0, 1
        while True:
            response = send()
            if method not in _IDEMPOTENT or response.status_code != 503 or attempt >= settings.UNAVAILABLE_ATTEMPTS:
                return response
            delay = _retry_after(response)
            if delay is None or waited + delay > self.unavailable_max_wait:
                return response
            response.close()
            time.sleep(delay)
            waited += delay
            attempt += 1

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
            raise AuthenticationError(f"{self.endpoint} needs a token" if not token else "the registry did not accept this token")
        credentials.save_login(self.endpoint, token, self.home)
        return who

    def logout(self) -> bool:
        return credentials.forget_login(self.endpoint, self.home)

    # --- bases -----------------------------------------------------------------------------
    def bases(self) -> list[BaseInfo]:
        return [_build(BaseInfo, b) for b in self._pages("/v1/bases")]

    def base(self, name: str) -> BaseInfo:
        return _build(BaseInfo, self._request("GET", f"/v1/bases/{names.parse_base_name(name)}").json())

    def register_base(
        self, name: str, fingerprint: str, *, architecture: str | None = None, parameter_count: int | None = None,
        config: dict | None = None,
    ) -> tuple[BaseInfo, bool]:
        """Register a base model; returns it and whether it was new (same name and fingerprint again is a no-op)."""
        body = {"name": names.parse_base_name(name), "fingerprint": fingerprint, "architecture": architecture,
                "parameter_count": parameter_count, "config": config}
        r = self._request("POST", "/v1/bases", json=body)
        return _build(BaseInfo, r.json()), r.status_code == 201

    def register_base_from_checkpoint(self, name: str, path: str | os.PathLike[str]) -> tuple[BaseInfo, bool]:
        """Register the local checkpoint at `path` (HF directory or .safetensors) as base `name`:
        its fingerprint, architecture and parameter count are computed here."""
        from codec.checkpoint import Checkpoint

        names.parse_base_name(name)
        ckpt = Checkpoint.open(path)
        config = ckpt.config if isinstance(ckpt.config, dict) else None
        architecture = None
        if config:
            archs = config.get("architectures")
            architecture = archs[0] if isinstance(archs, list) and archs else config.get("model_type")
        params = sum(math.prod(ckpt.entry(n).shape) for n in ckpt.names)
        return self.register_base(name, ckpt.fingerprint(), architecture=architecture, parameter_count=params, config=config)

    # --- repositories and versions ---------------------------------------------------------
    def repos(self, *, base: str | None = None, namespace: str | None = None, query: str | None = None) -> list[RepoInfo]:
        params = {k: v for k, v in (("base", base), ("namespace", namespace), ("q", query)) if v}
        return [RepoInfo.from_api(r) for r in self._pages("/v1/repos", params)]

    def repo(self, repo: str) -> RepoInfo:
        namespace, name = names.parse_repo_name(repo)
        return RepoInfo.from_api(self._request("GET", f"/v1/repos/{namespace}/{name}").json())

    def create_repo(self, repo: str, *, base: str, description: str = "", visibility: str = "public") -> RepoInfo:
        namespace, name = names.parse_repo_name(repo)
        body = {"namespace": namespace, "name": name, "base": base, "description": description, "visibility": visibility}
        return RepoInfo.from_api(self._request("POST", "/v1/repos", json=body).json())

    def delete_repo(self, repo: str) -> None:
        namespace, name = names.parse_repo_name(repo)
        self._request("DELETE", f"/v1/repos/{namespace}/{name}")

    def versions(self, repo: str) -> list[VersionInfo]:
        namespace, name = names.parse_repo_name(repo)
        return [_build(VersionInfo, v) for v in self._pages(f"/v1/repos/{namespace}/{name}/versions")]

    def version(self, ref: str | Ref) -> VersionInfo:
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        return _build(VersionInfo, self._request("GET", f"/v1/repos/{ref.repo}/versions/{ref.api_ref}").json())

    def delete_version(self, repo: str, number: int) -> None:
        namespace, name = names.parse_repo_name(repo)
        self._request("DELETE", f"/v1/repos/{namespace}/{name}/versions/{number}")

    def tags(self, repo: str) -> list[TagInfo]:
        namespace, name = names.parse_repo_name(repo)
        return [_build(TagInfo, t) for t in self._request("GET", f"/v1/repos/{namespace}/{name}/tags").json()]

    def set_tag(self, repo: str, tag: str, version: int) -> TagInfo:
        namespace, name = names.parse_repo_name(repo)
        r = self._request("PUT", f"/v1/repos/{namespace}/{name}/tags/{_settable_tag(tag)}", json={"version": version})
        return _build(TagInfo, r.json())

    def delete_tag(self, repo: str, tag: str) -> None:
        namespace, name = names.parse_repo_name(repo)
        self._request("DELETE", f"/v1/repos/{namespace}/{name}/tags/{_settable_tag(tag)}")

    # --- push ------------------------------------------------------------------------------
    def push(
        self, path: str | os.PathLike[str], repo: str, *, base: str | None = None,
        base_path: str | os.PathLike[str] | None = None, tags: list[str] | tuple[str, ...] = (),
        description: str = "", visibility: str = "public", progress: Progress | None = None,
    ) -> PushResult:
        """Validate the delta at `path`, make sure the repository exists with the delta's base
        (creating it, and registering the base from `base_path` when asked), upload the storage
        form, publish it as the next version and set `tags`.

        Identical bytes already in the registry are not sent again. An interrupted upload is
        resumed by calling push again with the same file: only the missing parts are sent."""
        started = time.perf_counter()
        progress = progress or _Silent()
        path = Path(path)
        namespace, name = names.parse_repo_name(repo)
        tags = [_settable_tag(t) for t in tags]
        with DeltaFile.open(path) as delta:  # every check a reader makes, before any network traffic
            meta = dict(delta.metadata)
        repo_info, created = self._repo_for_push(f"{namespace}/{name}", meta, base=base, base_path=base_path,
                                                 description=description, visibility=visibility)
        target = f"{self.endpoint} {repo_info.full_name}"
        declared = {"description": description, "fidelity": _json_dict(meta.get("fidelity"))}
        with self.cache.push_state(path) as state:
            progress.start("compressing", None)
            info = state.prepare(path)
            upload, resumed, version = self._open_upload(state, target, repo_info.full_name, info, declared)
            sent = skipped = 0
            if version is None:
                if not upload["exists"]:
                    staged = state.stage(path)
                    if staged != info:  # the storage form came out different (another zstd): declare again
                        self._abort_upload(upload["id"])
                        state.forget_upload(target)
                        info = staged
                        upload, resumed, _ = self._open_upload(state, target, repo_info.full_name, info, declared)
                    if not upload["exists"]:
                        sent, skipped = self._send(upload, state.staged_path, info, progress)
                progress.start("verifying (registry)", None)
                try:
                    version = self._complete(upload, state, target)
                finally:
                    progress.stop()
            state.finish(target)
        for tag in tags:
            self.set_tag(repo_info.full_name, tag, version.number)
        if tags:
            version = self.version(Ref(namespace, name, version=version.number))
        return PushResult(version=version, deduplicated=bool(upload and upload["exists"]), sent_bytes=sent,
                          resumed=resumed, skipped_parts=skipped, created_repo=created, tags=tags,
                          seconds=time.perf_counter() - started, already_published=upload is None)

    def _repo_for_push(
        self, repo: str, meta: dict, *, base: str | None, base_path, description: str, visibility: str
    ) -> tuple[RepoInfo, bool]:
        fingerprint = meta["base_fingerprint"]
        try:
            info, created = self.repo(repo), False
        except NotFoundError:
            base_name = base or meta["base_model"]
            try:
                base_info = self.base(base_name)
            except NotFoundError:
                if base_path is None:
                    raise NotFoundError(
                        f"base model {base_name!r} is not registered; register it with "
                        f"`deltactl base add {base_name} PATH` or push with --base-path PATH"
                    ) from None
                base_info, _ = self.register_base_from_checkpoint(base_name, base_path)
            _check_fingerprint(repo, base_info.name, base_info.fingerprint, meta)
            try:
                info, created = self.create_repo(repo, base=base_info.name, description=description, visibility=visibility), True
            except ConflictError:  # a concurrent push created it first
                info, created = self.repo(repo), False
        if base is not None and base != info.base:
            raise BaseMismatchError(f"{repo} holds deltas of base {info.base!r}, not {base!r}",
                                    expected=info.base_fingerprint, actual=fingerprint)
        _check_fingerprint(repo, info.base, info.base_fingerprint, meta)
        return info, created

    def _open_upload(
        self, state, target: str, repo: str, info: BlobInfo, declared: dict
    ) -> tuple[dict | None, bool, VersionInfo | None]:
        """The pending upload of this file to this repository if one survives (resume), else a new
        one: (upload, resumed, None). When the saved upload was published already (an earlier run
        lost the answer of `complete`), no upload but its version: (None, True, version)."""
        upload_id = state.upload_id(target)
        if upload_id:
            try:
                return self._request("GET", f"/v1/uploads/{upload_id}").json(), True, None
            except (NotFoundError, ConflictError):
                pass
            try:  # completing a published upload again only names its version
                return None, True, self._post_complete(f"/v1/uploads/{upload_id}/complete")
            except (NotFoundError, ConflictError):
                state.forget_upload(target)  # aborted or collected meanwhile
        body = {"digest": info.digest, "size": info.size, "raw_digest": info.raw_digest, "raw_size": info.raw_size, **declared}
        upload = self._request("POST", f"/v1/repos/{repo}/uploads", json=body).json()
        state.remember_upload(target, upload["id"])
        return upload, False, None

    def _abort_upload(self, upload_id: str) -> None:
        with contextlib.suppress(RegistryError, NetworkError):
            self._request("DELETE", f"/v1/uploads/{upload_id}")

    def _send(self, upload: dict, staged: Path, info: BlobInfo, progress: Progress) -> tuple[int, int]:
        """Send the staged bytes where the registry said; returns (bytes sent, parts skipped)."""
        method = upload["method"]
        if method == "stream":  # through the registry
            progress.start("uploading", info.size)
            with self._network("the upload"):
                r = put_range(self._http, upload["upload_url"], staged, 0, info.size, advance=progress.advance)
            if r.is_error:
                raise api_error(r)
            return info.size, 0
        if method == "s3-put":  # straight to the blob store
            url = upload["upload_url"]
            progress.start("uploading", info.size)
            with self._blob_store_network(url, "the upload", upload=True):
                r = put_range(self._blob_http, url, staged, 0, info.size, advance=progress.advance)
            if r.is_error:
                raise NetworkError(f"the blob store at {_netloc(url)} refused the upload: HTTP {r.status_code} {s3_error(r)}")
            return info.size, 0
        parts = upload["parts"]
        todo = [p for p in parts if not p.get("received")]
        done_bytes = sum(p["size"] for p in parts if p.get("received"))
        progress.start("uploading", info.size, completed=done_bytes)
        finished: list[int] = []
        try:
            upload_parts(self._blob_http, staged, todo, concurrency=self.upload_concurrency, advance=progress.advance,
                         on_part=lambda p: finished.append(p["number"]))
        except (NetworkError, httpx.TransportError) as exc:
            if isinstance(exc, httpx.TransportError):
                exc = self._blob_store_error(exc, _netloc(todo[0]["url"]), "the upload", upload=True, brief=True)
            stored = len(parts) - len(todo) + len(finished)
            raise TransferInterruptedError(
                f"push interrupted with {stored} of {len(parts)} parts stored ({exc}); "
                "run the same command again to send only the missing parts"
            ) from None
        return sum(p["size"] for p in todo), len(parts) - len(todo)

    def _post_complete(self, url: str) -> VersionInfo:
        """`POST …/complete`, sent a second time if the connection failed: completing an upload the
        registry already published answers with that version (200) instead of a second one."""
        with self._network(f"POST {url}"):
            try:
                response = self._http.post(url)
            except _CONNECTION_LOST:  # the request, or only the answer, was lost
                time.sleep(0.5)
                response = self._http.post(url)
        if response.is_error:
            raise api_error(response)
        return _build(VersionInfo, response.json())

    def _complete(self, upload: dict, state, target: str) -> VersionInfo:
        try:
            return self._post_complete(upload["complete_url"])
        except (DigestMismatchError, InvalidUploadError, BaseMismatchUploadError):
            state.forget_upload(target)  # the registry dropped the upload and its bytes
            state.discard_staged()
            raise
        except NotFoundError:
            state.forget_upload(target)
            raise NotFoundError(f"upload {upload['id']} is gone (expired or collected); push again") from None

    # --- pull ------------------------------------------------------------------------------
    def pull(self, ref: str | Ref, *, output: str | os.PathLike[str] | None = None, progress: Progress | None = None) -> PullResult:
        """Make `ref` available locally: from the cache when it holds the delta, else downloaded
        (resuming a partial download with Range), verified and decompressed into the cache.
        With `output`, a copy is written there too (a directory gets `<namespace>-<name>-v<N>.bdelta`)."""
        started = time.perf_counter()
        progress = progress or _Silent()
        version = self.version(ref)
        expected = version.blob
        with self.cache.blob_lock(expected.raw_digest):
            corrupt_before = len(self.cache.corrupt_found)
            blob = self.cache.cached_blob(expected.raw_digest, expected.raw_size)
            repaired = len(self.cache.corrupt_found) > corrupt_before
            hit = blob is not None
            downloaded = 0
            if not hit:
                try:
                    downloaded = self._download(version, progress)
                finally:
                    progress.stop()
                blob = self.cache.blob_path(expected.raw_digest)
        path = self.cache.record_version(self.endpoint, version.as_dict())
        if output is not None:
            path = _copy_out(blob, output, version)
        return PullResult(version=version, path=path, blob=blob, cache_hit=hit, downloaded_bytes=downloaded,
                          seconds=time.perf_counter() - started, repaired=repaired)

    def _download(self, version: VersionInfo, progress: Progress) -> int:
        expected = version.blob
        partial = self.cache.partial_path(expected.raw_digest, expected.digest)
        dest = self.cache.blob_path(expected.raw_digest)
        moved, fresh_retry = 0, False
        attempt = 0
        while True:
            attempt += 1
            offset = partial.stat().st_size if partial.exists() else 0
            if offset > expected.size:
                partial.unlink()
                offset = 0
            try:
                with self._open_download(version.download_url, offset, expected.size) as (chunks, offset):
                    progress.start("downloading", expected.size, completed=offset)

                    def advance(n: int) -> None:
                        nonlocal moved
                        moved += n
                        progress.advance(n)

                    receive_blob(chunks, partial=partial, offset=offset, dest=dest, expected=expected, advance=advance)
                return moved
            except TransferInterruptedError:
                if attempt >= settings.TRANSFER_ATTEMPTS:
                    raise
                time.sleep(0.2 * 2 ** (attempt - 1))
            except CorruptDownloadError:
                if offset == 0 or fresh_retry:
                    raise
                fresh_retry = True  # the kept partial bytes may be what is wrong: once more from zero

    @contextlib.contextmanager
    def _open_download(self, url: str, offset: int, size: int) -> Iterator[tuple[Iterator[bytes], int]]:
        """The blob's bytes from `offset` on: through the registry or, after its redirect, from the
        blob store (without the token). Yields (chunks, the offset they actually start at)."""
        if offset >= size:
            yield iter(()), offset
            return
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        redirected = False
        with self._network("the download"):
            response = self._waiting_out_503("GET", lambda: self._http.send(
                self._http.build_request("GET", url, headers=headers), stream=True))
        if response.status_code in _REDIRECTS:
            location = response.headers.get("location", "")
            response.close()
            redirected = True
            with self._blob_store_network(location, "the download"):
                response = self._waiting_out_503("GET", lambda: self._blob_http.send(
                    self._blob_http.build_request("GET", location, headers=headers), stream=True))
        try:
            if response.is_error:
                response.read()
                if not redirected:
                    raise api_error(response)
                raise BlobStoreError(f"the blob store answered HTTP {response.status_code} to the download")
            start = offset if response.status_code == 206 else 0

            def chunks() -> Iterator[bytes]:
                try:
                    yield from response.iter_bytes(CHUNK)
                except httpx.TransportError as exc:
                    raise TransferInterruptedError(f"connection lost: {_reason(exc)}") from None

            yield chunks(), start
        finally:
            response.close()


def _settable_tag(tag: str) -> str:
    names.check_tag(tag)
    if tag in names.RESERVED_TAGS:
        raise InvalidRequestError(f"tag {tag!r} is maintained by the registry (it follows the newest version)")
    return tag


def _check_fingerprint(repo: str, base_name: str, fingerprint: str, meta: dict) -> None:
    if meta["base_fingerprint"] != fingerprint:
        raise BaseMismatchError(
            f"{repo} holds deltas of base {base_name!r} (fingerprint {fingerprint}), but this delta was made "
            f"for base {meta['base_model']!r} (fingerprint {meta['base_fingerprint']})",
            expected=fingerprint, actual=meta["base_fingerprint"],
        )


def _copy_out(blob: Path, output: str | os.PathLike[str], version: VersionInfo) -> Path:
    target = output_file(output, f"{version.repository.replace('/', '-')}-v{version.number}.bdelta")
    with open(blob, "rb") as src, AtomicWriter(target, inputs=[blob]) as dst:
        shutil.copyfileobj(src, dst, CHUNK)
    return target


def _origin(response: httpx.Response) -> str:
    """`scheme://host:port` of the server that answered."""
    url = response.request.url
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
