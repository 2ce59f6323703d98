"""The repository page's chart, laid out on the server: size ratio and one fidelity figure
across versions, as polylines and axis ticks in SVG user units (the template draws them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from registry.server.web.present import FIDELITY_FIGURES

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 52, 56, 14, 30


@dataclass(frozen=True)
class Series:
    label: str
    points: str  # "x,y x,y ..." for <polyline points>
    dots: list[tuple[float, float, str]]  # (x, y, title) for the markers (drawn when there are few)
    ticks: list[tuple[float, str]]  # (y, label) on this series' axis


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    x_ticks: list[tuple[float, str]]
    ratio: Series | None
    fidelity: Series | None
    versions: int
    notes: list[str] = field(default_factory=list)


def _nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    if hi <= lo:  # one value: a band around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = 10 ** math.floor(math.log10((hi - lo) / count))
    for mult in (1, 2, 2.5, 5, 10):
        if (hi - lo) / (step * mult) <= count:
            step *= mult
            break
    start = math.floor(lo / step) * step
    ticks, value = [], start
    while value <= hi + step * 0.5:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _series(
    label: str,
    xs: list[float],
    values: list[float | None],
    fmt,
    bottom_y: float,
    top_y: float,
    numbers: list[int],
    max_dots: int,
) -> Series | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    ticks = _nice_ticks(min(present), max(present))
    lo, hi = ticks[0], ticks[-1] if ticks[-1] > ticks[0] else ticks[0] + 1
    scale = lambda v: bottom_y - (v - lo) / (hi - lo) * (bottom_y - top_y)  # noqa: E731
    pts = [(x, scale(v), n, v) for x, v, n in zip(xs, values, numbers, strict=True) if v is not None]
    dots = [(x, y, f"v{n}: {fmt(v)}") for x, y, n, v in pts] if len(pts) <= max_dots else []
    return Series(
        label=label,
        points=" ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in pts),
        dots=dots,
        ticks=[(scale(t), fmt(t)) for t in ticks],
    )


def build_chart(
    series: list[tuple[int, float | None, dict | None]], *, total: int, max_dots: int = 60
) -> Chart | None:
    """The chart of (number, size ratio, fidelity) rows, oldest first; None when there is no trend
    to draw (fewer than two versions, or no figures)."""
    if len(series) < 2:
        return None
    numbers = [n for n, _, _ in series]
    first, last = numbers[0], numbers[-1]
    span = last - first
    plot_w = WIDTH - LEFT - RIGHT
    xs = [LEFT + (n - first) / span * plot_w for n in numbers]
    bottom_y, top_y = HEIGHT - BOTTOM, TOP
    ratio = _series(
        "size ratio",
        xs,
        [r if r else None for _, r, _ in series],
        lambda v: f"{v:g}×",
        bottom_y,
        top_y,
        numbers,
        max_dots,
    )
    fidelity = None
    for key, label, percent in FIDELITY_FIGURES:  # the first figure the versions record
        values = [_figure(f, key) for _, _, f in series]
        if any(v is not None for v in values):
            fmt = (lambda v: f"{v * 100:.4g}%") if percent else (lambda v: f"{v:.3g}")
            fidelity = _series(label, xs, values, fmt, bottom_y, top_y, numbers, max_dots)
            break
    if ratio is None and fidelity is None:
        return None
    x_ticks = [
        (LEFT + (t - first) / span * plot_w, f"v{int(t)}")
        for t in _nice_ticks(first, last, 6)
        if first <= t <= last and float(t).is_integer()
    ]
    # the first and newest versions are always labelled; round ticks too close to them are dropped
    x_ticks = (
        [(xs[0], f"v{first}")]
        + [(x, t) for x, t in x_ticks if xs[0] + 40 < x < xs[-1] - 40]
        + [(xs[-1], f"v{last}")]
    )
    notes = [f"the newest {len(series)} of {total} versions"] if total > len(series) else []
    return Chart(WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM, x_ticks, ratio, fidelity, len(series), notes)


def _figure(fidelity: dict | None, key: str) -> float | None:
    value = fidelity.get(key) if isinstance(fidelity, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
