"""A codec defined outside codec/ (per-row int8 codes of the delta) registered through
`codec.codecs.register` goes through compress, validation, inspect, apply, the terms and the
registry page with no edit anywhere else: the generic paths dispatch on the file's codec."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from codec import codecs
from codec.apply import apply_delta
from codec.checkpoint import Checkpoint
from codec.codecs.base import Codec, CodecOptions, Encoding, Piece, TensorDescription, require_parts
from codec.compress import BitDeltaOptions, CompressOptions, compress
from codec.container import TensorEntry
from codec.errors import CodecError, IncompatibleDeltaError, InvalidDeltaError, UnsupportedFormatError
from codec.format import DeltaFile, validate_delta_header
from codec.summary import summarize
from codec.terms import LowRankTerm, entry_terms
from registry.server.web import present
from registry.server.web.tensors import summarize_entries


@dataclass(frozen=True)
class RowInt8Options(CodecOptions):
    codec: ClassVar[str] = "rowint8"
    clip: float = 1.0  # share of the row's max |Δ| the int8 grid spans

    def __post_init__(self) -> None:
        if not 0 < self.clip <= 1:
            raise CodecError(f"clip must be in (0, 1], got {self.clip}")


def _decode(codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return (codes.to(torch.float32) - 128) * step[:, None]


class RowInt8(Codec):
    """Δ̂[o, i] = step[o] · (codes[o, i] − 128): `N.q8` U8 [out, in], `N.q8_step` F32 [out]."""

    name = "rowint8"
    options_type = RowInt8Options
    kinds = ("q8", "q8_step")
    primary_kind = "q8"
    finite_kinds = ("q8_step",)
    json_metadata_keys = ("x-rowint8",)
    label = "int8 rows"

    def encode(self, finetuned, base, name, options, context) -> Encoding:
        # Its own cheaper alternative: a grid clipped below a fifth of the range is never used.
        clip = options.clip if options.clip >= 0.2 else 1.0
        delta = finetuned.to(torch.float32) - base.to(torch.float32)
        step = (delta.abs().amax(dim=1) * clip / 127).clamp_min(1e-30)
        codes = (delta / step[:, None]).round().clamp(-127, 127).add(128).to(torch.uint8)
        return Encoding(
            [Piece("q8", "U8", codes), Piece("q8_step", "F32", step)],
            zero=not bool(delta.any()),
            fallback=None if clip == options.clip else f"clip {options.clip} too tight: clip 1 used",
        )

    def metadata(self, options, context) -> dict[str, str]:
        return {"x-rowint8": json.dumps({"clip": options.clip})}

    def check_parts(self, name: str, parts: Mapping[str, TensorEntry]) -> None:
        require_parts(name, parts, self.kinds, self.name)
        if parts["q8"].dtype != "U8" or len(parts["q8"].shape) != 2:
            raise InvalidDeltaError(f"{name}.q8 must be U8 [out, in]")

    def expected_shapes(self, entry, info, shape) -> dict[str, list[int]]:
        return {"q8": list(shape), "q8_step": [shape[0]]}

    def describe_tensor(self, entry, info) -> TensorDescription:
        out, inn = entry.part("q8").shape
        return TensorDescription(
            {"rows": out}, entry.part("q8").nbytes, entry.part("q8_step").nbytes, out * inn
        )

    def covered_weights(self, entry) -> int:
        out, inn = entry.part("q8").shape
        return out * inn

    def describe(self, metadata, bits=None) -> list[str]:
        return [f"clip {json.loads(metadata['x-rowint8'])['clip']}"] if "x-rowint8" in metadata else []

    def reconstruct_blocks(self, delta, name, base, dtype) -> Iterator[torch.Tensor]:
        codes, step = delta.tensor(name + ".q8"), delta.tensor(name + ".q8_step")
        for r in range(0, base.shape[0], 32):
            yield (base[r : r + 32].to(torch.float32) + _decode(codes[r : r + 32], step[r : r + 32])).to(
                dtype
            )

    def terms(self, delta, name):
        def factors():
            d = _decode(delta.tensor(name + ".q8"), delta.tensor(name + ".q8_step"))
            return torch.eye(d.shape[1]), d

        return (LowRankTerm(delta.tensor(name + ".q8").shape[1], factors),)


@pytest.fixture
def rowint8():
    codec = codecs.register(RowInt8())
    yield codec
    codecs.unregister(codec.name)


@pytest.fixture
def int8_file(rowint8, llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    path = tmp_path / "q.bdelta"
    report = compress(base_dir, ft_dir, path, CompressOptions(codec=RowInt8Options(clip=0.5)))
    return path, report


def _state(dir_) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(dir_)
    return {n: ckpt.get(n) for n in ckpt.names}


def test_a_registered_codec_round_trips_compress_open_apply(int8_file, llama_pair, tmp_path):
    path, report = int8_file
    base_dir, ft_dir = llama_pair
    delta = DeltaFile.open(path)
    assert delta.codec == "rowint8" and json.loads(delta.metadata["x-rowint8"]) == {"clip": 0.5}
    assert report.binarized and {delta.entries[n].kind for n in report.binarized} == {"rowint8"}
    got = _state(apply_delta(base_dir, path, tmp_path / "out").out_dir)
    base, ft = _state(base_dir), _state(ft_dir)
    for name in report.binarized:
        # An independent decode of the stored bytes: step · (code − 128), added in fp32.
        codes = np.asarray(delta.tensor(name + ".q8"), dtype=np.float32)
        step = np.asarray(delta.tensor(name + ".q8_step"))
        want = base[name].numpy() + step[:, None] * (codes - 128)
        assert np.array_equal(got[name].numpy(), want.astype(np.float32))
        # clip 0.5 spans half each row's range: the tensor changed, and int8 rows track the delta closely.
        err = (got[name] - ft[name]).norm() / (ft[name] - base[name]).norm()
        assert 0 < err < 0.5
    for name in report.dense:
        assert torch.equal(got[name], ft[name])


def test_terms_inspect_and_the_registry_page_dispatch_to_it(int8_file):
    path, report = int8_file
    delta = DeltaFile.open(path)
    name = report.binarized[0]
    (term,) = entry_terms(delta, name)
    a, b = term.factors()
    want = codecs.get("rowint8").reconstruct(delta, name, torch.zeros(b.shape), torch.float32)
    assert isinstance(term, LowRankTerm) and torch.equal(b @ a, want)

    info = summarize(path)
    assert info["codec"] == "rowint8" and info["metadata"]["x-rowint8"] == {"clip": 0.5}
    assert info["counts"]["rowint8"] == len(report.binarized) and info["counts"]["full"] == len(report.dense)
    shown = next(t for t in info["tensors"] if t["name"] == name)
    assert shown["kind"] == "rowint8" and shown["rows"] == delta.entries[name].part("q8").shape[0]
    assert info["bits_per_binarized_weight"] == pytest.approx(
        sum(delta.entries[n].nbytes for n in report.binarized)
        * 8
        / sum(np.prod(delta.entries[n].part("q8").shape) for n in report.binarized)
    )

    raw = path.read_bytes()
    summary = summarize_entries(validate_delta_header(raw, len(raw))[1])
    assert {k.kind: (k.label, k.tensors) for k in summary.kinds} == {
        "rowint8": ("int8 rows", len(report.binarized)),
        "full": ("kept dense (.full)", len(report.dense)),
    }
    assert present.codec_line("rowint8", None, delta.metadata) == "rowint8 · clip 0.5"


def _rewrite(path, tmp_path, change):
    delta = DeltaFile.open(path)
    tensors = {k: delta.tensor(k).clone() for k in delta.header.tensors}
    metadata = dict(delta.metadata)
    change(metadata, tensors)
    out = tmp_path / "bad.bdelta"
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_its_own_validation_runs_when_a_file_is_opened(int8_file, llama_pair, tmp_path):
    path, report = int8_file
    base_dir, _ = llama_pair
    name = report.binarized[0]

    def drop_step(meta, tensors):
        del tensors[name + ".q8_step"]

    with pytest.raises(
        InvalidDeltaError, match=r"rowint8 tensor needs \.q8 and \.q8_step \(missing q8_step\)"
    ):
        DeltaFile.open(_rewrite(path, tmp_path, drop_step))

    def nan_step(meta, tensors):
        tensors[name + ".q8_step"][0] = float("nan")

    with pytest.raises(InvalidDeltaError, match=rf"{name}\.q8_step contains NaN or Inf"):
        DeltaFile.open(_rewrite(path, tmp_path, nan_step))

    def sign_part(meta, tensors):
        tensors[name + ".sign"] = torch.zeros(1, 2, 1, dtype=torch.uint8)

    with pytest.raises(InvalidDeltaError, match=r"\.sign tensors in a 'rowint8' delta"):
        DeltaFile.open(_rewrite(path, tmp_path, sign_part))

    def narrow(meta, tensors):
        tensors[name + ".q8"] = tensors[name + ".q8"][:, :-1].contiguous()

    delta = DeltaFile.open(_rewrite(path, tmp_path, narrow))  # the header is consistent in itself
    base = Checkpoint.open(base_dir)
    with pytest.raises(IncompatibleDeltaError, match=rf"{name}\.q8 has shape \[\d+, \d+\] but base shape"):
        delta.check_base({n: (base.entry(n).dtype, base.entry(n).shape) for n in base.names}, None)


def test_once_unregistered_its_files_are_refused_as_an_unknown_codec(rowint8, int8_file):
    path, _ = int8_file
    codecs.unregister("rowint8")
    try:
        with pytest.raises(
            UnsupportedFormatError, match="unknown codec 'rowint8' \\(known: bitdelta, deltadq"
        ):
            DeltaFile.open(path)
    finally:
        codecs.register(rowint8)


def test_registry_refuses_a_second_codec_of_a_name_or_one_that_claims_full(rowint8):
    with pytest.raises(CodecError, match="already registered"):
        codecs.register(RowInt8())

    class Full(RowInt8):
        name = "densecopy"
        kinds = ("full",)

    with pytest.raises(CodecError, match="not .full"):
        codecs.register(Full())
    with pytest.raises(
        CodecError,
        match="codec must be one of 'bitdelta', 'deltadq', 'hybrid', 'lowrank-mp', 'rowint8', got 'zip'",
    ):
        codecs.get("zip")


def test_compress_options_name_their_codec():
    assert CompressOptions().codec_name == "bitdelta"
    assert CompressOptions(codec=BitDeltaOptions(planes=2)).codec.planes == 2
    with pytest.raises(CodecError, match="codec options must be a codec's options object"):
        CompressOptions(codec="deltadq")  # type: ignore[arg-type]


def test_a_codecs_own_cheaper_form_is_recorded_as_a_fallback(rowint8, llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    tight = compress(base_dir, ft_dir, tmp_path / "t.bdelta", CompressOptions(codec=RowInt8Options(clip=0.1)))
    loose = compress(base_dir, ft_dir, tmp_path / "l.bdelta", CompressOptions(codec=RowInt8Options(clip=1.0)))
    assert tight.fallbacks == {n: "clip 0.1 too tight: clip 1 used" for n in tight.binarized}
    assert json.loads(DeltaFile.open(tight.path).metadata["x-fallbacks"]) == tight.fallbacks
    assert summarize(tight.path)["fallbacks"] == tight.fallbacks
    assert loose.fallbacks == {} and "x-fallbacks" not in DeltaFile.open(loose.path).metadata
    for name in tight.binarized:
        assert torch.equal(
            DeltaFile.open(tight.path).tensor(name + ".q8"), DeltaFile.open(loose.path).tensor(name + ".q8")
        )
