"""The codec interface: what one codec module owns (its options, encoding a tensor pair, its tensor
kinds and metadata in the format and their validation, decoding, its terms, how it is shown).

Validation and description run without torch (the registry validates uploads with numpy alone);
encoding and decoding import torch inside the methods that need it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..container import TensorEntry
from ..errors import InvalidDeltaError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..activations import InputMoments
    from ..format import DeltaEntry, DeltaFile
    from ..terms import Term


@dataclass(frozen=True)
class CodecOptions:
    """Base of a codec's options: a frozen dataclass whose `__post_init__` validates it (raising
    CodecError). `codec` names the codec the options belong to."""

    codec: ClassVar[str]


@dataclass(frozen=True)
class Piece:
    """One stored tensor of an encoded tensor: `N.<kind>` with safetensors dtype `dtype`."""

    kind: str
    dtype: str
    tensor: torch.Tensor


@dataclass(frozen=True)
class ErrorStats:
    """What the safety rule needs to compare an encoding Δ̂ with leaving the tensor at base:
    ⟨Δ̂, Δ⟩, ‖Δ̂‖² and ‖Δ‖², each weighted per input column by E[x_i²] when calibrating."""

    dot: float
    decoded_sq: float
    target_sq: float

    @property
    def squared_error(self) -> float:
        """‖Δ − Δ̂‖² (weighted alike)."""
        return self.target_sq - 2 * self.dot + self.decoded_sq

    @property
    def along_delta_error(self) -> float:
        """‖Δ − cΔ‖² for c = ⟨Δ̂, Δ⟩ / ‖Δ‖²: the error of Δ̂'s component along Δ, blind to noise
        orthogonal to Δ. It exceeds ‖Δ‖² (leaving the tensor at base) iff c < 0 or c > 2."""
        return self.target_sq - 2 * self.dot + self.dot**2 / self.target_sq if self.target_sq else 0.0

    @classmethod
    def of_blocks(
        cls, blocks: Iterable[tuple[torch.Tensor, torch.Tensor]], weight: torch.Tensor | None
    ) -> ErrorStats:
        """Accumulate over row blocks of (Δ, Δ̂), fp32 [rows, in], weighted per input column by
        `weight` [in] (E[x_i²] of the layer's inputs) when given; products in fp32, sums in fp64."""
        import torch

        dot = decoded_sq = target_sq = 0.0
        for target, decoded in blocks:
            weighted = target if weight is None else target * weight
            dot += float(torch.sum(weighted * decoded, dtype=torch.float64))
            target_sq += float(torch.sum(weighted * target, dtype=torch.float64))
            decoded_sq += float(
                torch.sum(
                    decoded * decoded if weight is None else decoded * decoded * weight, dtype=torch.float64
                )
            )
        return cls(dot, decoded_sq, target_sq)


@dataclass(frozen=True)
class Encoding:
    """A codec's encoding of one tensor: its stored pieces, whether Δ̂ is exactly zero (the tensor
    is then left out when the fine-tune kept its base's layout), its error statistics (None when
    the codec does not measure them), and `fallback`: why the codec chose its own cheaper form
    instead of the one asked for (recorded in the file's `x-fallbacks`), or None."""

    pieces: list[Piece]
    zero: bool
    stats: ErrorStats | None = None
    fallback: str | None = None


@dataclass(frozen=True)
class EncodeContext:
    """What compress knows beyond the tensor pair: calibration moments of the layer inputs."""

    input_moments: InputMoments | None = None

    def channel_weight(self, name: str, in_features: int) -> torch.Tensor | None:
        """E[x_i²] of the layer's inputs (codec/activations.py), or None without calibration."""
        return self.input_moments.weight_for(name, in_features) if self.input_moments else None

    def search_record(self) -> dict:
        """What a codec's per-tensor search measured its error by, for the file's metadata."""
        moments = self.input_moments
        if moments is None:
            return {"error": "weights (isotropic inputs)"}
        return {
            "error": "output, weighted by calibration E[x^2]",
            "tokens": moments.tokens,
            "data_fingerprint": moments.data_fingerprint,
        }


@dataclass(frozen=True)
class TensorDescription:
    """How `inspect` shows one compressed tensor: `fields` (JSON-ready, beside name/kind/bytes),
    payload bytes (codes, signs) and side bytes (scales, steps, parameters), and the number of
    base weights it covers (an upper bound where rows end in padding)."""

    fields: dict[str, Any]
    payload_bytes: int
    side_bytes: int
    weights: int


#: Reads one small stored tensor as a numpy array (little-endian, the entry's dtype).
ReadArray = Callable[[TensorEntry], "np.ndarray"]


class Codec(ABC):
    """One compression method. Subclasses set the class attributes and implement the methods;
    register an instance with `codec.codecs.register` (modules in codec/codecs/ defining `CODEC`
    are registered on import)."""

    #: The `codec` metadata value.
    name: ClassVar[str]
    #: Its options type (a frozen CodecOptions dataclass).
    options_type: ClassVar[type[CodecOptions]]
    #: The tensor-name suffixes it stores (`N.<kind>`), none of them "full".
    kinds: ClassVar[tuple[str, ...]]
    #: The kind whose shape follows from the base tensor's (named in shape errors).
    primary_kind: ClassVar[str]
    #: Kinds holding F32 side values that must be finite (checked when a file is opened).
    finite_kinds: ClassVar[tuple[str, ...]] = ()
    #: Metadata keys it owns whose values are JSON (parsed for inspect and the registry page).
    json_metadata_keys: ClassVar[tuple[str, ...]] = ()
    #: What calibration text does for it: "distill" (scales trained afterwards, codec/distill.py)
    #: or "moments" (layer-input moments steer encoding, passed in EncodeContext).
    calibration: ClassVar[str] = "moments"
    #: How the registry page labels its tensors.
    label: ClassVar[str]

    # --- compress ---------------------------------------------------------------------------
    def default_options(self) -> CodecOptions:
        return self.options_type()

    @abstractmethod
    def encode(
        self,
        finetuned: torch.Tensor,
        base: torch.Tensor,
        name: str,
        options: CodecOptions,
        context: EncodeContext,
    ) -> Encoding:
        """Encode the 2-D pair (same shape, the model's float dtype) into stored pieces."""

    @abstractmethod
    def metadata(self, options: CodecOptions, context: EncodeContext) -> dict[str, str]:
        """The file-level metadata keys this codec writes (beside the format's own)."""

    def error(self, stats: ErrorStats) -> float:
        """Its error proxy of an encoding, comparable with that of leaving the tensor at base
        (Δ̂ = 0: ‖Δ‖², `stats.target_sq`); compress keeps the encoding only when it is not worse.
        By default the squared reconstruction error ‖Δ − Δ̂‖² (weighted when calibrating)."""
        return stats.squared_error

    # --- reading (numpy only) ---------------------------------------------------------------
    def validate_metadata(self, metadata: Mapping[str, str]) -> None:
        """Refuse (InvalidDeltaError / UnsupportedFormatError) metadata this codec cannot read;
        by default a codec keeps nothing of its own in the metadata that needs checking."""
        return None

    @abstractmethod
    def check_parts(self, name: str, parts: Mapping[str, TensorEntry]) -> None:
        """Refuse a tensor whose stored parts (kind -> header entry) are incomplete or misshapen."""

    def read_info(self, entry: DeltaEntry, read: ReadArray) -> Any:
        """Per-tensor parameters stored in small tensors, read and validated when a file is
        opened (InvalidDeltaError); None when the header says everything."""
        return None

    @abstractmethod
    def expected_shapes(self, entry: DeltaEntry, info: Any, shape: tuple[int, int]) -> dict[str, list[int]]:
        """The shape each base-dependent part must have over a 2-D base tensor of `shape`."""

    @abstractmethod
    def describe_tensor(self, entry: DeltaEntry, info: Any) -> TensorDescription:
        """`inspect`'s view of one tensor."""

    def covered_weights(self, entry: DeltaEntry) -> int | None:
        """Base weights the tensor covers, from the header alone (None: not known from it)."""
        return None

    def describe(self, metadata: Mapping[str, str], bits: int | None = None) -> list[str]:
        """Short facts for the registry's codec line (e.g. ["1 plane", "per-matrix"])."""
        return []

    # --- decoding ---------------------------------------------------------------------------
    @abstractmethod
    def reconstruct_blocks(
        self, delta: DeltaFile, name: str, base: torch.Tensor, dtype: torch.dtype
    ) -> Iterator[torch.Tensor]:
        """Row blocks of `(W_base.float() + Δ̂).to(dtype)`, in order (what apply writes). A block
        may live in a buffer the next one reuses: consume (or copy) it before advancing."""

    def reconstruct(
        self, delta: DeltaFile, name: str, base: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """The whole reconstructed tensor, from `reconstruct_blocks` (bit-identical to it)."""
        import torch

        result = torch.empty(base.shape, dtype=dtype)
        row = 0
        for block in self.reconstruct_blocks(delta, name, base, dtype):
            result[row : row + block.shape[0]] = block
            row += block.shape[0]
        return result

    @abstractmethod
    def terms(self, delta: DeltaFile, name: str) -> tuple[Term, ...]:
        """The codec.terms forms whose sum is Δ̂ of tensor `name` (what loaders consume)."""


def require_parts(name: str, parts: Mapping[str, TensorEntry], required: tuple[str, ...], codec: str) -> None:
    """Refuse a tensor that lacks one of `required` or holds a part of another kind."""
    extra, missing = set(parts) - set(required), [k for k in required if k not in parts]
    if extra:
        raise InvalidDeltaError(f"{name}: {codec} tensor has unexpected part(s) .{', .'.join(sorted(extra))}")
    if missing:
        listed = ", .".join(required[:-1]) + " and ." + required[-1] if len(required) > 1 else required[0]
        raise InvalidDeltaError(
            f"{name}: {codec} tensor needs .{listed} (missing {', '.join(sorted(missing))})"
        )


__all__ = [
    "Codec",
    "CodecOptions",
    "EncodeContext",
    "Encoding",
    "ErrorStats",
    "Piece",
    "ReadArray",
    "TensorDescription",
    "require_parts",
]
