"""Hostile `.bdelta` files and storage blobs: the reader refuses them with the codec's own errors,
never crashes or hangs, and whatever it accepts round-trips (delta_fuzz.py states the oracle).

The seeded runs here are the CI portion; bench/reliability_fuzz.py runs the long,
coverage-guided campaign (>= 10,000 cases) with the same mutators and oracle.
"""

from __future__ import annotations

import io
import json
import random
import struct

import pytest
import torch  # noqa: F401  the oracle's round trip needs it; imported here, not under a case's deadline
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec.container import parse_header_bytes
from codec.errors import CorruptFileError, HeaderError, InvalidDeltaError
from codec.format import DeltaFile
from tests.support.corpus import encode, seed_deltas, storage_form
from tests.support.delta_fuzz import check_blob, check_delta, mutate, mutate_blob

SEEDS = seed_deltas()
CHUNKS, CASES_PER_CHUNK, BLOB_CASES_PER_CHUNK = 4, 300, 100


def test_seeds_are_valid_and_round_trip(tmp_path):
    for name, data in SEEDS.items():
        assert check_delta(data, tmp_path / f"{name}.bdelta") == "accepted", name


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_mutated_files_are_refused_cleanly_or_round_trip(chunk, tmp_path):
    rng = random.Random(20261125 + chunk)
    outcomes = {"accepted": 0, "rejected": 0}
    path = tmp_path / "case.bdelta"
    for i in range(CASES_PER_CHUNK):
        seed = rng.choice(list(SEEDS.values()))
        mutant = mutate(rng, seed, SEEDS)
        try:
            outcomes[check_delta(mutant, path)] += 1
        except AssertionError as exc:
            raise AssertionError(f"chunk {chunk} case {i}: {exc}\nmutant head: {mutant[:300]!r}") from exc
    # the mutators reach both sides of the reader's decision
    assert outcomes["rejected"] > CASES_PER_CHUNK // 2 and outcomes["accepted"] > 0, outcomes


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_mutated_storage_blobs_never_decompress_to_other_bytes(chunk):
    rng = random.Random(7_000 + chunk)
    outcomes = {"accepted": 0, "rejected": 0}
    for i in range(BLOB_CASES_PER_CHUNK):
        raw = rng.choice(list(SEEDS.values()))
        mutant = mutate_blob(rng, storage_form(raw).data)
        try:
            outcomes[check_blob(mutant, raw)] += 1
        except AssertionError as exc:
            raise AssertionError(f"chunk {chunk} case {i}: {exc}") from exc
    assert outcomes["rejected"] > BLOB_CASES_PER_CHUNK // 2, outcomes


# --- headers built from scratch (hypothesis) -------------------------------------------------
_dim = st.one_of(st.integers(0, 8), st.sampled_from([2**32, 2**63, 2**64 - 1, 2**64, -1]))
_record = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["U8", "F32", "F16", "I32", "BF16", "F64", "X", 1]),
        "shape": st.lists(_dim, max_size=4),
        "data_offsets": st.lists(
            st.one_of(st.integers(0, 64), st.sampled_from([2**64, -1, 2**63])), min_size=0, max_size=3
        ),
    }
)
_names = st.sampled_from(
    [
        "a.weight.sign",
        "a.weight.scale",
        "a.weight.full",
        "b.weight.full",
        "b.weight.sign",
        "c.weight.dq_codes",
        "c.weight.dq_step",
        "c.weight.dq_params",
        "d",
        "e.weight.bias",
    ]
)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    tensors=st.dictionaries(_names, _record, max_size=5),
    body=st.binary(max_size=96),
    codec=st.sampled_from(["bitdelta", "deltadq"]),
)
def test_headers_from_scratch(tmp_path_factory, tensors, body, codec):
    meta = {
        "format": "deltastore.delta",
        "format_version": "1",
        "codec": codec,
        "base_model": "org/base",
        "base_fingerprint": "sha256:" + "5a" * 32,
        "dtype": "float16",
        "deltadq": '{"seed": 1, "mask": "splitmix64-v1"}',
    }
    raw = json.dumps({"__metadata__": meta, **tensors}).encode()
    data = struct.pack("<Q", len(raw)) + raw + body
    check_delta(data, tmp_path_factory.mktemp("scratch") / "case.bdelta")


# --- regressions: inputs that crashed the reader before the fixes ----------------------------
def _with_header(text: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(text)) + text + body


@pytest.mark.parametrize(
    "data, message",
    [
        # a list as dtype raised TypeError (unhashable) instead of HeaderError
        (
            _with_header(b'{"a.weight.full":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}', b"abcd"),
            "unknown dtype",
        ),
        # an integer of 5,000 digits raised the interpreter's ValueError for long int conversion
        (
            _with_header(
                b'{"a.weight.full":{"dtype":"U8","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,1]}}', b"a"
            ),
            "UTF-8 JSON",
        ),
        # deep nesting raised RecursionError
        (_with_header(b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nested too deeply"),
        # NaN is not JSON (the stock library refuses it)
        (_with_header(b'{"__metadata__":{"k":"v"},"x":NaN}'), "NaN is not JSON"),
        # a lone surrogate is not Unicode: the stock library refuses it, so must we
        (_with_header(b'{"__metadata__":{"k":"\\ud800"}}'), "surrogate"),
        (
            _with_header(b'{"\\udc00.full":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"a"),
            "surrogate",
        ),
        # dims beyond 64 bits (with a zero dim, so the byte count is 0): the stock library cannot load it
        (
            _with_header(
                b'{"a.weight.full":{"dtype":"F32","shape":[0,'
                + str(10**30).encode()
                + b'],"data_offsets":[0,0]}}'
            ),
            "non-negative integers below 2\\*\\*63",
        ),
        (
            _with_header(
                b'{"a.weight.full":{"dtype":"F32","shape":['
                + str(2**62).encode()
                + b","
                + str(2**62).encode()
                + b',0],"data_offsets":[0,0]}}'
            ),
            "64-bit",
        ),
        # a dimension torch cannot hold (int64), in a zero-size tensor the stock header check lets through
        (
            _with_header(
                b'{"a.weight.full":{"dtype":"U8","shape":[0,'
                + str(2**63 + 5).encode()
                + b'],"data_offsets":[0,0]}}'
            ),
            "below 2\\*\\*63",
        ),
    ],
    ids=[
        "list-dtype",
        "long-int",
        "deep-nesting",
        "nan",
        "surrogate-meta",
        "surrogate-name",
        "dim-over-u64",
        "numel-overflow",
        "dim-over-i64",
    ],
)
def test_regressions_are_header_errors(data, message):
    with pytest.raises(HeaderError, match=message):
        parse_header_bytes(data, len(data))


@pytest.mark.parametrize(
    "key, value",
    [
        ("calibration", '{"loss": NaN}'),
        ("fidelity", '{"kl": Infinity}'),
        ("fidelity", "[" * 5000 + "]" * 5000),
        ("x-hf-config", "{not json"),
    ],
)
def test_metadata_json_must_be_strict_json(tmp_path, key, value):
    data = SEEDS["per_matrix"]
    doc = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    meta = doc.pop("__metadata__")
    meta[key] = value
    tensors = [(n, i["dtype"], i["shape"], b"") for n, i in doc.items()]
    body = data[8 + struct.unpack("<Q", data[:8])[0] :]
    parts = []
    for n, dtype, shape, _ in tensors:
        b, e = doc[n]["data_offsets"]
        parts.append((n, dtype, shape, body[b:e]))
    path = tmp_path / "d.bdelta"
    path.write_bytes(encode(parts, meta))
    with pytest.raises(InvalidDeltaError, match=f"{key}.*not valid JSON"):
        DeltaFile.open(path)


def test_flipped_byte_in_a_cached_delta_is_caught_by_the_digest_before_it_is_read(tmp_path):
    """The cache keeps the decompressed `.bdelta`; a byte flipped in it after download is found by
    its recorded sha256 before the file is opened for a model (a flipped sign bit is otherwise a
    perfectly valid file)."""
    raw = SEEDS["per_matrix"]
    stored = storage_form(raw)
    flipped = bytearray(raw)
    flipped[-3] ^= 0x10  # a sign byte: the file stays structurally valid
    path = tmp_path / "cached.bdelta"
    path.write_bytes(bytes(flipped))
    with DeltaFile.open(path) as delta:  # structurally still valid...
        assert delta.entries
    with pytest.raises(CorruptFileError, match="sha256"):
        DeltaFile.open(path, expected_digest=stored.raw_digest)  # ...but not the recorded bytes
    path.write_bytes(raw)
    with DeltaFile.open(path, expected_digest=stored.raw_digest) as delta:
        assert delta.metadata["codec"] == "bitdelta"
    # and the stored form itself: a flipped byte fails decompression or the raw digest
    bad = bytearray(stored.data)
    bad[len(bad) // 2] ^= 0x01
    from codec.storage import BlobCorruptError, decompress_stream

    with pytest.raises(BlobCorruptError):
        decompress_stream(
            io.BytesIO(bytes(bad)),
            io.BytesIO(),
            max_output_size=stored.raw_size,
            expected_raw_digest=stored.raw_digest,
        )


def test_zstd_checksum_and_size_lies_are_refused():
    raw = SEEDS["deltadq"]
    frame = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(raw)
    for cut in (len(frame) - 1, len(frame) - 4, 12):
        assert check_blob(frame[:cut], raw) == "rejected"
