"""The CLI's wording and exit codes, declared once: one table mapping deltastore exceptions to a
label, an exit code and, where the CLI knows one, what to do next (library errors carry no CLI advice)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from typing import TypeVar

import typer

from codec.errors import (
    BaseMismatchError,
    BaseNameError,
    CalibrationDataError,
    CheckpointError,
    CodecError,
    DeltaStoreError,
    HubUnavailableError,
    IncompatibleDeltaError,
    InvalidDeltaError,
    ModelNotFoundError,
)
from codec.files import OutputPathError
from registry.client.errors import (
    BaseNotRegisteredError,
    CacheError,
    CorruptDownloadError,
    NetworkError,
    OfflineError,
    RegistryUnavailableError,
    RegistryUnreachableError,
)
from registry.client.settings import SettingsError
from registry.common.errors import (
    AuthenticationError,
    BaseMismatchUploadError,
    BlobStoreError,
    ConflictError,
    DatabaseUnavailableError,
    DigestMismatchError,
    InvalidRequestError,
    InvalidUploadError,
    NotFoundError,
    PermissionDeniedError,
    RegistryError,
    SchemaOutOfDateError,
    SizeMismatchError,
    StorageFullError,
    UploadTooLargeError,
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

#: What to do next: a sentence, or one made from the exception.
Hint = str | Callable[[BaseException], str]

#: Most specific first: the first class an exception is an instance of decides.
TABLE: list[tuple[type[BaseException], int, str, Hint | None]] = [
    (SettingsError, EXIT_USAGE, "invalid setting", None),
    (OutputPathError, EXIT_INVALID, "output path", None),
    (BaseMismatchUploadError, EXIT_BASE_MISMATCH, "base mismatch", None),
    (BaseMismatchError, EXIT_BASE_MISMATCH, "base mismatch", None),
    (IncompatibleDeltaError, EXIT_BASE_MISMATCH, "delta does not fit the base", None),
    (BaseNameError, EXIT_INVALID, "base name", "pass --base-name ORG/MODEL"),
    (InvalidDeltaError, EXIT_INVALID, "invalid delta file", None),
    (ModelNotFoundError, EXIT_NOT_FOUND, "model not found", None),
    (HubUnavailableError, EXIT_NETWORK, "model hub unavailable", None),
    (CheckpointError, EXIT_INVALID, "unreadable checkpoint", None),
    (CalibrationDataError, EXIT_INVALID, "bad calibration data", None),
    (CodecError, EXIT_INVALID, "invalid input", None),
    (AuthenticationError, EXIT_AUTH, "authentication", "log in with `deltactl login`, or set DELTACTL_TOKEN"),
    (PermissionDeniedError, EXIT_AUTH, "permission denied", None),
    (
        BaseNotRegisteredError,
        EXIT_NOT_FOUND,
        "not found",
        lambda exc: (
            f"register it with `deltactl base add {exc.base_name} PATH` or push with --base-path PATH"
        ),
    ),
    (NotFoundError, EXIT_NOT_FOUND, "not found", None),
    (ConflictError, EXIT_CONFLICT, "conflict", None),
    (CorruptDownloadError, EXIT_INVALID, "corrupt download", None),
    (InvalidUploadError, EXIT_INVALID, "invalid delta file", None),
    (SizeMismatchError, EXIT_INVALID, "size mismatch", None),
    (DigestMismatchError, EXIT_INVALID, "digest mismatch", None),
    (UploadTooLargeError, EXIT_INVALID, "too large", None),
    (InvalidRequestError, EXIT_INVALID, "invalid request", None),
    (StorageFullError, EXIT_STORAGE_FULL, "registry storage full", None),
    (SchemaOutOfDateError, EXIT_NETWORK, "schema out of date", None),
    (DatabaseUnavailableError, EXIT_NETWORK, "registry unavailable", None),
    (BlobStoreError, EXIT_NETWORK, "blob store", None),
    (RegistryUnavailableError, EXIT_NETWORK, "registry unavailable", None),
    (
        RegistryUnreachableError,
        EXIT_NETWORK,
        "network",
        "set DELTACTL_REGISTRY or `deltactl login --registry URL`",
    ),
    (OfflineError, EXIT_NETWORK, "offline", None),
    (NetworkError, EXIT_NETWORK, "network", None),
    (CacheError, EXIT_ERROR, "cache error", None),
    (RegistryError, EXIT_ERROR, "registry error", None),
]


def exit_code_for(exc: BaseException) -> tuple[int, str]:
    code, label, _ = describe(exc)
    return code, label


def describe(
    exc: BaseException, hints: Mapping[type[BaseException], Hint] | None = None
) -> tuple[int, str, str]:
    """(exit code, label, message) of an exception; a command's own `hints` win over the table's."""
    code, label, hint = next(
        ((code, label, hint) for exc_type, code, label, hint in TABLE if isinstance(exc, exc_type)),
        (EXIT_ERROR, "error", None),
    )
    for exc_type, command_hint in (hints or {}).items():
        if isinstance(exc, exc_type):
            hint = command_hint
            break
    message = str(exc)
    if hint is not None:
        message += f" ({hint(exc) if callable(hint) else hint})"
    return code, label, message


#: Packages of the optional extras (pyproject.toml) and the extra that brings each.
EXTRAS = {
    "fastapi": "server",
    "uvicorn": "server",
    "sqlalchemy": "server",
    "alembic": "server",
    "psycopg": "server",
    "boto3": "server",
    "botocore": "server",
    "prometheus_client": "server",
    "jinja2": "server",
    "torch": "gpu",
    "triton": "gpu",
    "transformers": "hf",
    "accelerate": "hf",
    "gguf": "hf",
}


def missing_extra(exc: ImportError) -> str | None:
    """`needs the 'server' extra ...` when `exc` is a package of an extra that is not installed."""
    package = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(package)
    if extra is None:
        return None
    return (
        f"this command needs {package}, which comes with deltastore's {extra!r} extra: "
        f"pip install 'deltastore[{extra}]'"
    )


class _State:
    debug = False


state = _State()
F = TypeVar("F", bound=Callable)


def handle_errors(fn: F | None = None, *, hints: Mapping[type[BaseException], Hint] | None = None):
    """Turn a DeltaStoreError (or an OS error on a user path) into `error: <label>: <message>`
    on stderr and the table's exit code; with --debug, let the traceback through. `hints` add
    what to do next for errors this command can say more about (`@handle_errors(hints={...})`)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (DeltaStoreError, OSError) as exc:
                if state.debug:
                    raise
                if isinstance(exc, DeltaStoreError):
                    code, label, message = describe(exc, hints)
                else:
                    code, label = EXIT_INVALID, "file error"
                    message = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
                typer.echo(f"error: {label}: {message}", err=True)
                raise typer.Exit(code) from None
            except ImportError as exc:
                message = missing_extra(exc)
                if message is None or state.debug:
                    raise
                typer.echo(f"error: missing extra: {message}", err=True)
                raise typer.Exit(EXIT_ERROR) from None
            except KeyboardInterrupt:
                typer.echo("interrupted", err=True)
                raise typer.Exit(EXIT_INTERRUPTED) from None

        return wrapper  # type: ignore[return-value]

    return decorate(fn) if fn is not None else decorate


def fail(message: str, code: int = EXIT_ERROR) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


__all__ = ["TABLE", "describe", "exit_code_for", "fail", "handle_errors", "state", "sys"]
