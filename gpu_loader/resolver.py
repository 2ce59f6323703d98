"""Turn what `DeltaModel.load()` is given into a local `.bdelta` path.

A path is used as is; a registry ref (`acme/math:prod`, `acme/code@3`, `acme/math`) goes through
an injected resolver callable (ref -> local path), e.g. the registry client's pull-into-cache.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Union

from codec.errors import DeltaStoreError

from .errors import UnresolvedRefError

#: ref -> local path of the decompressed `.bdelta` (for instance the registry client cache).
RefResolver = Callable[[str], Union[str, "os.PathLike[str]"]]
DeltaRef = Union[str, "os.PathLike[str]"]

REF_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(?:[:@][\w.-]+)?$")


def is_registry_ref(ref: str) -> bool:
    """Whether `ref` has the shape `namespace/name[:tag|@version]` (and is not a `.bdelta` path)."""
    return bool(REF_RE.match(ref)) and not ref.endswith(".bdelta")


def resolve_ref(ref: DeltaRef, resolver: RefResolver | None = None) -> Path:
    """Local path for `ref`. An existing file wins over the ref reading of the same string."""
    if isinstance(ref, os.PathLike):
        return Path(ref)
    if not isinstance(ref, str) or not ref:
        raise TypeError(f"a delta ref must be a path or a registry ref string, got {ref!r}")
    path = Path(ref).expanduser()
    if path.exists() or not is_registry_ref(ref):
        return path
    if resolver is None:
        raise UnresolvedRefError(
            f"{ref!r} is a registry ref, but this DeltaModel has no resolver: pass "
            "resolver=<callable ref -> local .bdelta path> (e.g. the registry client's pull) "
            "to DeltaModel.from_pretrained, or load a .bdelta path"
        )
    try:
        out = resolver(ref)
    except DeltaStoreError:
        raise
    except Exception as exc:  # the resolver is user code: say which ref failed
        raise UnresolvedRefError(f"resolving {ref!r} failed: {exc}") from exc
    if out is None:
        raise UnresolvedRefError(f"the resolver returned no path for {ref!r}")
    return Path(out)
