"""What a request's `model` names, turned into something the engine can run: the base, or a local
`.bdelta` pulled through `registry.client` into its cache (one pull per ref at a time, shared by
concurrent first requests; a ref resolved before keeps serving while the registry is down).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from codec.errors import BaseMismatchError, DeltaStoreError
from codec.format import DeltaFile

from ..resolver import is_registry_ref


class ModelNotFoundError(DeltaStoreError, LookupError):
    """`model` is neither the base's name, a registry ref the registry knows, nor an allowed path."""


class RegistryDownError(DeltaStoreError, ConnectionError):
    """The registry cannot be reached and the ref is not in the local cache."""


@dataclass(frozen=True)
class Resolved:
    model: str  # what the client asked for
    path: Path | None  # None: the base
    version: int | None = None


class ModelResolver:
    """`model` string -> `Resolved`. `api` is a `registry.client.RegistryApi` (or None: only the
    base, and local paths when `allow_paths`). Movable refs (tags, latest) are looked up again
    after `refresh_seconds`; if the registry is down then, the last answer keeps serving."""

    def __init__(
        self,
        *,
        base_name: str,
        base_fingerprint: str,
        api=None,
        allow_paths: bool = False,
        refresh_seconds: float = 30.0,
    ) -> None:
        self.base_name, self.base_fingerprint = base_name, base_fingerprint
        self.api, self.allow_paths, self.refresh_seconds = api, allow_paths, refresh_seconds
        self._lock = threading.Lock()
        self._known: dict[str, tuple[Resolved, float]] = {}
        self._inflight: dict[str, Future] = {}
        self.pulls = 0  # registry pulls started (a cache hit in the client's cache counts too)

    def resolve(self, model: str) -> Resolved:
        """Blocking (network); call from a worker thread."""
        if model == self.base_name:
            return Resolved(model, None)
        if self.allow_paths and model.endswith(".bdelta"):
            path = Path(model).expanduser()
            if not path.is_file():
                raise ModelNotFoundError(f"model {model!r}: no such .bdelta file")
            self.check_base(path, model)
            return Resolved(model, path.resolve())
        if not is_registry_ref(model) or self.api is None:
            raise ModelNotFoundError(self._unknown(model))
        with self._lock:
            known = self._known.get(model)
            if known is not None and (
                self._pinned_version(model) or time.monotonic() - known[1] < self.refresh_seconds
            ):
                return known[0]
            fut = self._inflight.get(model)
            owner = fut is None
            if owner:
                fut = self._inflight[model] = Future()
        if not owner:
            return fut.result()
        try:
            resolved = self._pull(model, known[0] if known else None)
            with self._lock:
                self._known[model] = (resolved, time.monotonic())
            fut.set_result(resolved)
            return resolved
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(model, None)

    def _pull(self, model: str, last: Resolved | None) -> Resolved:
        from registry.client.errors import NetworkError
        from registry.common.errors import InvalidNameError, NotFoundError

        with self._lock:
            self.pulls += 1
        try:
            pulled = self.api.pull(model)
        except NetworkError as exc:
            if last is not None:
                return last  # the registry is down: keep serving what it said before
            cached = self._from_cache(model)
            if cached is not None:
                return cached
            raise RegistryDownError(
                f"model {model!r} is not in the local cache and the registry is unreachable: {exc}"
            ) from exc
        except (NotFoundError, InvalidNameError) as exc:
            raise ModelNotFoundError(f"{self._unknown(model)} (registry: {exc})") from exc
        self.check_base(pulled.path, model)
        return Resolved(model, Path(pulled.path).resolve(), pulled.version.number)

    def _from_cache(self, model: str) -> Resolved | None:
        """A version of `model` pulled by an earlier process: the exact version for `@N`, else the
        newest cached one of the repository (a tag cannot be checked while the registry is down)."""
        from registry.client.api import parse_ref

        ref = parse_ref(model)
        entries = [
            e
            for e in self.api.cache.entries()
            if e.repository == ref.repo and e.present and (ref.version is None or e.number == ref.version)
        ]
        if not entries:
            return None
        best = max(entries, key=lambda e: e.number)
        return Resolved(model, Path(best.path).resolve(), best.number)

    @staticmethod
    def _pinned_version(model: str) -> bool:
        return "@" in model

    def check_base(self, path: str | os.PathLike[str], model: str) -> None:
        with DeltaFile.open(path) as delta:
            if delta.base_fingerprint != self.base_fingerprint:
                raise BaseMismatchError(
                    f"model {model!r} is a delta of base {delta.base_model!r} "
                    f"(fingerprint {delta.base_fingerprint}), "
                    f"but this server holds {self.base_name!r} (fingerprint {self.base_fingerprint})",
                    expected=self.base_fingerprint,
                    actual=delta.base_fingerprint,
                )

    def _unknown(self, model: str) -> str:
        hint = (
            "a registry ref namespace/name[:tag|@N]" if self.api is not None else "(no registry configured)"
        )
        return f"model {model!r} not found: this server serves {self.base_name!r} and its deltas, {hint}"

    def repositories(self) -> list:
        """The registry's repositories for this base ([] without a registry or when it is down)."""
        if self.api is None:
            return []
        from registry.client.errors import NetworkError

        try:
            return [r for r in self.api.repos() if r.base_fingerprint == self.base_fingerprint]
        except NetworkError:
            return []
