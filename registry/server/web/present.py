"""How the pages show values: sizes, digests, times, ratios, the fidelity figures `deltactl show`
reads (gain recovered, KL, top-1), a version's codec line, and JSON metadata as rows."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

from codec import codecs

#: The fidelity figures a table shows, in `deltactl show`'s order: (key, column label, percent?).
FIDELITY_FIGURES = (
    ("gain_recovered", "gain kept", True),
    ("kl_to_finetuned", "KL", False),
    ("top1_agreement", "top-1", True),
)
#: Header metadata keys that hold JSON text (docs/format.md).
JSON_METADATA = ("calibration", "fidelity", *codecs.json_metadata_keys(), "x-fallbacks", "x-hf-config")


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns


def short_digest(digest: str | None, length: int = 12) -> str:
    if not digest:
        return "–"
    return digest.removeprefix("sha256:")[:length]


def when(stamp: dt.datetime | None, zone: bool = True) -> str:
    if stamp is None:
        return "–"
    return stamp.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M" + (" UTC" if zone else ""))


def ratio(value: float | None) -> str:
    return f"{value:.1f}×" if value else "–"


def parameters(count: int | None) -> str:
    if not count:
        return "–"
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def number(value: Any, percent: bool = False) -> str:
    """A fidelity figure for a cell: fractions as percent where `percent`, else 3 significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–" if value is None else str(value)
    return f"{value * 100:.1f}%" if percent else f"{value:.3g}"


def fidelity_cells(fidelity: dict | None) -> list[str]:
    """The FIDELITY_FIGURES of a fidelity record, one string each ("–" where absent)."""
    fidelity = fidelity if isinstance(fidelity, dict) else {}
    return [number(fidelity.get(key), percent) for key, _, percent in FIDELITY_FIGURES]


def fidelity_summary(fidelity: dict | None) -> str:
    """One line of the figures present, e.g. "gain kept 93.1% · KL 0.0123 · top-1 97.0%"."""
    if not isinstance(fidelity, dict) or not fidelity:
        return "–"
    parts = [
        f"{label} {number(fidelity[key], percent)}"
        for key, label, percent in FIDELITY_FIGURES
        if key in fidelity
    ]
    if not parts:  # other measures: the first numeric ones, like `deltactl show`
        parts = [
            f"{k} {number(v)}"
            for k, v in fidelity.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ][:3]
    return " · ".join(parts) or "recorded"


def codec_line(codec: str | None, bits: int | None, metadata: dict | None) -> str:
    """e.g. "bitdelta · 1 plane · per-matrix", "deltadq · 4-bit"."""
    metadata = metadata if isinstance(metadata, dict) else {}
    if not codec:
        return "–"
    parts = [codec]
    if codec in codecs.CODECS:  # an unknown codec (a newer writer's) is shown by name alone
        parts += codecs.get(codec).describe(metadata, bits)
    return " · ".join(parts)


def parse_json(text: Any) -> Any:
    """A metadata value that holds JSON, parsed; the text itself when it is not JSON."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def rows(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """A JSON value flattened to (dotted key, text) rows for a definition table."""
    if isinstance(value, dict):
        if not value:
            return [(prefix, "{}")] if prefix else []
        out: list[tuple[str, str]] = []
        for key in sorted(value):
            out += rows(value[key], f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(value, float):
        return [(prefix, f"{value:.6g}")]
    if isinstance(value, list):
        return [(prefix, json.dumps(value))]
    return [(prefix, "null" if value is None else str(value))]
