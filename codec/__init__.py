"""deltastore codec: the format-v1 delta file (1-bit signs + scales), compress / apply / inspect.

from codec import compress, apply_delta, DeltaFile
compress("base/", "finetuned/", "math.bdelta")
apply_delta("base/", "math.bdelta", "math-model/")
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    BaseMismatchError,
    CheckpointError,
    CodecError,
    DeltaStoreError,
    HeaderError,
    IncompatibleDeltaError,
    InvalidDeltaError,
    TruncatedFileError,
    UnsupportedFormatError,
)
from .format import FILE_SUFFIX, FORMAT, FORMAT_VERSION, DeltaFile  # noqa: E402

__all__ = [
    "DeltaFile",
    "FILE_SUFFIX",
    "FORMAT",
    "FORMAT_VERSION",
    "BaseMismatchError",
    "CheckpointError",
    "CodecError",
    "DeltaStoreError",
    "HeaderError",
    "IncompatibleDeltaError",
    "InvalidDeltaError",
    "TruncatedFileError",
    "UnsupportedFormatError",
    "__version__",
]
