"""deltastore codec: the format-v1 delta file (1-bit signs + scales), compress / apply / inspect.

    from codec.compress import CompressOptions, compress
    from codec.apply import apply_delta
    from codec import DeltaFile

    compress("base/", "finetuned/", "math.bdelta", CompressOptions(base_name="org/base"))
    apply_delta("base/", "math.bdelta", "math-model/")
    delta = DeltaFile.open("math.bdelta")

Importing `codec` (and reading a delta with DeltaFile) needs no torch; compress and apply do.
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
