"""The codec registry: every compression method is one module here behind `base.Codec`, and
`get(name)` finds it; the format, compress, apply, inspect and the registry dispatch through it.

Modules of this package that define `CODEC` (a Codec instance) are registered on import, so a new
codec is one new module; `register` adds one from elsewhere (e.g. a test).
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import CodecError
from .base import Codec, CodecOptions

CODECS: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    """Add `codec` under its name. Codecs may share tensor kinds (a file's `codec` metadata says
    how to read them); "full" is the format's own kind and name."""
    if codec.name in CODECS or codec.name == "full":
        raise CodecError(f"a codec named {codec.name!r} is already registered")
    if "full" in codec.kinds or not codec.kinds:
        raise CodecError(f"codec {codec.name!r}: needs its own tensor kinds (not .full)")
    CODECS[codec.name] = codec
    return codec


def unregister(name: str) -> None:
    CODECS.pop(name, None)


def get(name: str) -> Codec:
    """The codec called `name`; CodecError naming the known ones otherwise."""
    try:
        return CODECS[name]
    except KeyError:
        raise CodecError(f"codec must be one of {', '.join(map(repr, names()))}, got {name!r}") from None


def names() -> list[str]:
    return sorted(CODECS)


def for_options(options: CodecOptions) -> Codec:
    """The codec an options object belongs to."""
    return get(options.codec)


def kinds() -> tuple[str, ...]:
    """Every stored tensor kind (`N.<kind>` suffix) a registered codec uses, then "full"."""
    seen = dict.fromkeys(k for name in names() for k in CODECS[name].kinds)
    return (*seen, "full")


def json_metadata_keys() -> tuple[str, ...]:
    """Metadata keys registered codecs own whose values are JSON (e.g. "deltadq")."""
    return tuple(dict.fromkeys(k for name in names() for k in CODECS[name].json_metadata_keys))


def _register_builtin() -> None:
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if module != "base" and not module.startswith("_"):
            codec = getattr(importlib.import_module(f"{__name__}.{module}"), "CODEC", None)
            if codec is not None:
                register(codec)


_register_builtin()

__all__ = [
    "CODECS",
    "Codec",
    "CodecOptions",
    "for_options",
    "get",
    "json_metadata_keys",
    "kinds",
    "names",
    "register",
    "unregister",
]
