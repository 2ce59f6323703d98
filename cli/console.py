"""Terminal output: rich on stderr for humans (progress, tables), plain JSON on stdout for machines."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def tensor_progress(description: str, quiet: bool = False) -> Iterator:
    """A per-tensor progress bar on stderr; yields a callback `(name, index, total)`."""
    if quiet or not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tensor]}"),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=None, tensor="")

        def update(name: str, index: int, total: int) -> None:
            progress.update(task, total=total, completed=index, tensor=name)

        yield update


@contextlib.contextmanager
def loss_progress(description: str, total: int, quiet: bool = False) -> Iterator:
    """A training-step progress bar on stderr; yields a callback `(step, total, loss)`."""
    if quiet or not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]}"),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total, loss="-")

        def update(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, loss=f"{loss:.4g}")

        yield update


def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
