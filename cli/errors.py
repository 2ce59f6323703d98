"""One table mapping deltastore exceptions to a one-line message and a distinct exit code."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import typer

from codec.errors import (
    BaseMismatchError, CalibrationDataError, CheckpointError, CodecError, DeltaStoreError,
    HubUnavailableError, IncompatibleDeltaError, InvalidDeltaError, ModelNotFoundError,
)

# Exit codes (documented in the README and docs/client.md): 2 is click's usage error.
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_AUTH = 4
EXIT_CONFLICT = 5
EXIT_NETWORK = 6
EXIT_INVALID = 7
EXIT_BASE_MISMATCH = 8
EXIT_STORAGE_FULL = 9
EXIT_INTERRUPTED = 130

#: Most specific first; registry.client appends its own classes through `register`.
_TABLE: list[tuple[type[BaseException], int, str]] = [
    (BaseMismatchError, EXIT_BASE_MISMATCH, "base mismatch"),
    (IncompatibleDeltaError, EXIT_BASE_MISMATCH, "delta does not fit the base"),
    (InvalidDeltaError, EXIT_INVALID, "invalid delta file"),
    (ModelNotFoundError, EXIT_NOT_FOUND, "model not found"),
    (HubUnavailableError, EXIT_NETWORK, "model hub unavailable"),
    (CheckpointError, EXIT_INVALID, "unreadable checkpoint"),
    (CalibrationDataError, EXIT_INVALID, "bad calibration data"),
    (CodecError, EXIT_INVALID, "invalid input"),
]


def register(exc_type: type[BaseException], code: int, label: str) -> None:
    """Add a mapping ahead of the generic ones (used for the registry client's errors)."""
    _TABLE.insert(0, (exc_type, code, label))


def exit_code_for(exc: BaseException) -> tuple[int, str]:
    for exc_type, code, label in _TABLE:
        if isinstance(exc, exc_type):
            return code, label
    return EXIT_ERROR, "error"


class _State:
    debug = False


state = _State()
F = TypeVar("F", bound=Callable)


def handle_errors(fn: F) -> F:
    """Turn a DeltaStoreError (or an OS error on a user path) into `error: <label>: <message>`
    on stderr and the table's exit code; with --debug, let the traceback through."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DeltaStoreError, OSError) as exc:
            if state.debug:
                raise
            if isinstance(exc, DeltaStoreError):
                code, label = exit_code_for(exc)
                message = str(exc)
            else:
                code, label = EXIT_INVALID, "file error"
                message = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
            typer.echo(f"error: {label}: {message}", err=True)
            raise typer.Exit(code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def fail(message: str, code: int = EXIT_ERROR) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


__all__ = ["handle_errors", "register", "exit_code_for", "state", "fail", "sys"]
