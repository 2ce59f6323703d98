"""Byte sizes as people write them, parsed one way everywhere (shard sizes, memory budgets):
`"8GiB"`, `"512MB"`, `"8G"` (binary, like `free -h`), or a plain number of bytes."""

from __future__ import annotations

import re

from .errors import CodecError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


class SizeError(CodecError):
    """Text that is not a byte size."""


def parse_size(value: int | str) -> int:
    """`"8GiB"` -> 8589934592. Binary units (KiB, MiB, GiB, TiB; bare K/M/G/T too), decimal
    units (kB, MB, GB, TB), or a plain number of bytes (>= 0)."""
    if isinstance(value, bool):
        raise SizeError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise SizeError(f"size must be >= 0, got {value}")
        return value
    m = _SIZE_RE.match(str(value))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise SizeError(f"not a size: {value!r} (examples: '8GiB', '512MiB', '2GB', '8G', 1073741824)")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
