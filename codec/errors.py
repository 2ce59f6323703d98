"""The project's exception hierarchy, rooted here because every other package imports codec.

Each class subclasses a stdlib type so callers that know nothing of deltastore still catch it.
"""

from __future__ import annotations


class DeltaStoreError(Exception):
    """Root of every error deltastore raises on purpose."""


class CodecError(DeltaStoreError, ValueError):
    """A delta, checkpoint or argument the codec cannot accept."""


class InvalidDeltaError(CodecError):
    """The bytes are not a valid format-v1 delta file (malformed, truncated, forged)."""


class TruncatedFileError(InvalidDeltaError):
    """The file ends before the data its header promises."""


class HeaderError(InvalidDeltaError):
    """The safetensors header is malformed, too large, or its offsets are inconsistent."""


class CorruptFileError(InvalidDeltaError):
    """The bytes do not have the sha256 recorded for them (a corrupted or replaced copy)."""


class UnsupportedFormatError(InvalidDeltaError):
    """Wrong `format`, unknown `format_version` or unknown `codec`."""


class BaseMismatchError(CodecError):
    """The delta was made against a different base model than the one it is applied to."""

    def __init__(self, message: str, *, expected: str, actual: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class IncompatibleDeltaError(CodecError):
    """The delta is well formed but does not fit the base: missing tensor, shape or dtype mismatch."""


class CheckpointError(CodecError, OSError):
    """A model checkpoint (directory or .safetensors file) cannot be read."""


class ModelNotFoundError(CheckpointError):
    """A model named by a Hub id (or one of its revisions) that neither the Hub nor its local cache has."""


class HubUnavailableError(CheckpointError):
    """The model hub cannot be reached and the model is not in its local cache."""


class CalibrationDataError(CodecError):
    """Calibration data is missing, empty or not text."""


class NotSafetensorsError(HeaderError):
    """The bytes are not a safetensors file at all (so not a delta either)."""


class BaseNameError(CodecError):
    """A delta needs its base's registry name (`org/model`) and none valid is known."""


class NothingToCompressError(IncompatibleDeltaError):
    """No tensor of the fine-tune has its base tensor's shape: it was made from another model."""
