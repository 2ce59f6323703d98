"""Structure-aware mutation of valid `.bdelta` files and of their zstd storage form, and the
oracle every mutant must satisfy. Shared by tests/reliability/test_fuzz_codec.py (a short seeded
run) and bench/reliability_fuzz.py (the long, coverage-guided run).

The oracle, for the file reader (`codec.format.DeltaFile.open`):
- it either accepts or raises `InvalidDeltaError`; any other exception is a crash;
- it returns within `CASE_TIMEOUT` seconds (no hang);
- the registry's header-only validator agrees with it (only value checks, which need the tensor
  bytes, may refuse what the header check accepts);
- an accepted file round-trips: the stock `safetensors` library loads it with the same metadata,
  names, dtypes, shapes and bytes; its header re-encoded by our writer parses to the same
  tensors; its storage form passes the registry's upload verification with the same metadata.

For the storage form (`codec.storage.decompress_stream`, `registry.verify.verify_stream`): the
result is either the original bytes or a codec/registry error, never more output than the cap.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import random
import signal
import struct
from collections.abc import Callable
from pathlib import Path

import zstandard

from codec.container import MAX_HEADER_SIZE, TensorSpec, encode_header
from codec.errors import InvalidDeltaError
from codec.format import DeltaFile, validate_delta_header
from codec.storage import decompress_stream

CASE_TIMEOUT = 10.0
#: What a refusal by the full reader may say when the header-only check passed: value checks.
VALUE_REFUSALS = ("NaN or Inf", "dq_params", "implausibly large")


class FuzzFailure(AssertionError):
    """A mutant broke the oracle (crash, hang, disagreement or an accepted file that does not round-trip)."""


class Hang(BaseException):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise Hang in the main thread after `seconds` (SIGALRM); a no-op where signals are unavailable."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def _alarm(signum, frame):
        raise Hang(f"case took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- taking a valid file apart and putting it back together ----------------------------------
def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(doc: dict, body: bytes, *, header_len: int | None = None, pad: bool = True) -> bytes:
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if header_len is None else header_len % 2**64) + raw + body


def _tensor_names(doc: dict) -> list[str]:
    return [k for k in doc if k != "__metadata__"]


def _pick(rng: random.Random, doc: dict) -> str | None:
    names = _tensor_names(doc)
    return rng.choice(names) if names else None


def _relayout(doc: dict, body: bytes, order: list[str]) -> tuple[dict, bytes]:
    """Rewrite the tensors contiguously in `order`, moving their bytes along."""
    out, parts, offset = {k: v for k, v in doc.items() if k == "__metadata__"}, [], 0
    for name in order:
        info = dict(doc[name])
        begin, end = info["data_offsets"]
        chunk = body[begin:end]
        info["data_offsets"] = [offset, offset + len(chunk)]
        offset += len(chunk)
        out[name] = info
        parts.append(chunk)
    return out, b"".join(parts)


HUGE = [2**31, 2**32 - 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70, 10**30]
ODD_VALUES = [-1, -(2**63), 0.5, 1e308, True, False, None, "1", [], {}, [1], float("nan"), float("inf")]


# --- mutators: each takes (rng, data, seeds) and returns new bytes ---------------------------
def m_truncate(rng, data, seeds):
    return data[: rng.randrange(len(data))]


def m_extend(rng, data, seeds):
    return data + rng.randbytes(rng.choice([1, 7, 8, 64, 4096]))


def m_flip_bits(rng, data, seeds, lo: int = 0, hi: int | None = None):
    out = bytearray(data)
    hi = len(out) if hi is None else hi
    if hi <= lo:
        return bytes(out)
    for _ in range(rng.choice([1, 1, 2, 3, 8, 32])):
        i = rng.randrange(lo, hi)
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def m_flip_header(rng, data, seeds):
    (n,) = struct.unpack("<Q", data[:8])
    return m_flip_bits(rng, data, seeds, 0, min(len(data), 8 + n))


def m_flip_body(rng, data, seeds):
    (n,) = struct.unpack("<Q", data[:8])
    return m_flip_bits(rng, data, seeds, min(len(data), 8 + n), len(data))


def m_random_bytes(rng, data, seeds):
    out = bytearray(data)
    for _ in range(rng.choice([1, 4, 16])):
        i = rng.randrange(len(out))
        out[i] = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x22, 0x5C, 0x7B, 0x7D, rng.randrange(256)])
    return bytes(out)


def m_header_length(rng, data, seeds):
    (n,) = struct.unpack("<Q", data[:8])
    value = rng.choice(
        [
            0,
            1,
            7,
            n - 1,
            n + 1,
            n + 8,
            len(data),
            len(data) - 8,
            MAX_HEADER_SIZE,
            MAX_HEADER_SIZE + 1,
            2**32,
            2**63,
            2**64 - 1,
            2**64 - 8,
            rng.randrange(2**64),
        ]
    )
    return struct.pack("<Q", value % 2**64) + data[8:]


def m_header_bomb(rng, data, seeds):
    """A header that is (or claims to be) enormous: padding, a huge metadata value, many tensors."""
    doc, body = split(data)
    kind = rng.randrange(4)
    if kind == 0:
        doc.setdefault("__metadata__", {})["x-pad"] = "x" * rng.choice([1 << 16, 1 << 20, 4 << 20])
        return join(doc, body)
    if kind == 1:
        for i in range(rng.choice([1000, 20000])):
            doc[f"model.z{i}.weight.full"] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
        return join(doc, body)
    if kind == 2:  # a length within the limit that runs past the end of the file
        return struct.pack("<Q", MAX_HEADER_SIZE) + data[8:]
    return struct.pack("<Q", MAX_HEADER_SIZE + 1) + b"{" + b" " * 64


def m_offsets(rng, data, seeds):
    doc, body = split(data)
    name = _pick(rng, doc)
    if name is None:
        return data
    begin, end = doc[name]["data_offsets"]
    size = end - begin
    choice = rng.randrange(10)
    if choice == 0:
        new = [end, begin]
    elif choice == 1:
        big = rng.choice(HUGE)
        new = [big, big + size]
    elif choice == 2:
        new = [-1 * rng.choice([1, size or 1]), end]
    elif choice == 3:
        shift = rng.choice([-8, -1, 1, 8])
        new = [begin + shift, end + shift]
    elif choice == 4:  # overlap another tensor
        other = _pick(rng, doc)
        ob = doc[other]["data_offsets"][0]
        new = [ob, ob + size]
    elif choice == 5:
        new = [begin, end + rng.choice([1, 8, len(body) + 1])]
    elif choice == 6:
        new = rng.choice(
            [[begin], [begin, end, end], [], [float(begin), float(end)], [str(begin), str(end)], None, begin]
        )
    elif choice == 7:
        new = [begin, rng.choice(HUGE)]
    elif choice == 8:
        new = [rng.choice(ODD_VALUES), end]
    else:
        new = [0, size]
    doc[name]["data_offsets"] = new
    return join(doc, body)


def m_shape(rng, data, seeds):
    doc, body = split(data)
    name = _pick(rng, doc)
    if name is None:
        return data
    shape = list(doc[name]["shape"])
    choice = rng.randrange(9)
    if choice == 0 and shape:
        shape.pop(rng.randrange(len(shape)))
    elif choice == 1:
        shape.insert(rng.randrange(len(shape) + 1), rng.choice([1, 2, 0]))
    elif choice == 2 and shape:
        i = rng.randrange(len(shape))
        shape[i] = shape[i] * rng.choice([2, 8]) or 1
    elif choice == 3 and shape:
        shape[rng.randrange(len(shape))] = rng.choice(ODD_VALUES)
    elif choice == 4:
        shape = shape + [0, rng.choice(HUGE)]  # zero elements, overflowing dims
    elif choice == 5:
        shape = [rng.choice(HUGE), rng.choice(HUGE), 0]
    elif choice == 6 and len(shape) >= 2:
        shape[0], shape[-1] = shape[-1], shape[0]  # same element count, lying layout
    elif choice == 7:
        shape = rng.choice([[], None, "4", [[1]], {}])
    else:
        numel = math.prod(shape) if all(isinstance(d, int) for d in shape) else 1
        shape = [numel]
    doc[name]["shape"] = shape
    return join(doc, body)


def m_dtype(rng, data, seeds):
    doc, body = split(data)
    name = _pick(rng, doc)
    if name is None:
        return data
    doc[name]["dtype"] = rng.choice(
        [
            "U8",
            "I8",
            "F16",
            "BF16",
            "F32",
            "I32",
            "U32",
            "F64",
            "I64",
            "BOOL",
            "F8_E4M3",
            "F8_E5M2",
            "f32",
            "F4",
            "",
            "float32",
            5,
            None,
            ["F32"],
        ]
    )
    return join(doc, body)


def m_entry(rng, data, seeds):
    """Tensor records with missing or extra fields, or that are not objects."""
    doc, body = split(data)
    name = _pick(rng, doc)
    if name is None:
        return data
    choice = rng.randrange(4)
    if choice == 0:
        del doc[name][rng.choice(["dtype", "shape", "data_offsets"])]
    elif choice == 1:
        doc[name]["extra"] = 1
    elif choice == 2:
        doc[name] = rng.choice([None, [], "x", 1])
    else:
        doc["__metadata__"] = rng.choice([None, [], "x", 1, {"format": 1}, {}])
    return join(doc, body)


def m_metadata(rng, data, seeds):
    doc, body = split(data)
    meta = dict(doc.get("__metadata__") or {})
    key = rng.choice(
        [
            "format",
            "format_version",
            "codec",
            "base_model",
            "base_fingerprint",
            "dtype",
            "calibration",
            "fidelity",
            "deltadq",
            "x-planes",
            "x-finetuned-bytes",
            "x-hf-config",
            "created_with",
        ]
    )
    choice = rng.randrange(4)
    if choice == 0:
        meta.pop(key, None)
    elif choice == 1:
        meta[key] = rng.choice(
            [
                "",
                " ",
                "2",
                "1.0",
                "01",
                "deltastore.delta ",
                "bitdelta",
                "deltadq",
                "dense",
                "float16",
                "int8",
                "sha256:" + "0" * 63,
                "sha256:" + "G" * 64,
                "SHA256:" + "a" * 64,
                "x" * 100_000,
                "\ud800",
                "a\x00b",
                "NaN",
                "Infinity",
                '{"kl": NaN}',
                '{"kl": Infinity}',
                "[1, 2]",
                "{",
                '"s"',
                "1e999",
                "-0",
                '{"seed": -1, "mask": "splitmix64-v1"}',
                '{"seed": 18446744073709551616, "mask": "splitmix64-v1"}',
                '{"seed": true, "mask": "splitmix64-v1"}',
                '{"seed": 1.0, "mask": "splitmix64-v1"}',
                '{"seed": 3, "mask": "other"}',
                '{"seed": 3}',
                "[]",
                '{"seed": ' + "9" * 5000 + "}",
                "[" * 5000 + "]" * 5000,
            ]
        )
    elif choice == 2:
        meta[key] = rng.choice([1, None, True, [], {}, 1.5])
    else:
        meta[rng.choice(["x-junk", "unknown", "__metadata__", ""])] = "v"
    doc["__metadata__"] = meta
    return join(doc, body)


def m_names(rng, data, seeds):
    doc, body = split(data)
    name = _pick(rng, doc)
    if name is None:
        return data
    choice = rng.randrange(6)
    info = doc.pop(name)
    stem, _, kind = name.rpartition(".")
    if choice == 0:
        new = stem + "." + rng.choice(["signs", "bias", "weight", "SIGN", "full ", "dq_code", ""])
    elif choice == 1:
        new = stem
    elif choice == 2:
        new = rng.choice(
            ["", ".sign", "__metadata__", "a" * 10_000, "\ud800.full", "model/../x.full", "x\x00.full"]
        )
    elif choice == 3:
        # both .full and .sign (or a second part) for one base tensor
        new = stem + "." + rng.choice(["full", "sign", "scale", "dq_codes", "dq_step", "dq_params"])
    elif choice == 4:  # drop the tensor and its bytes: a sign without a scale, or the reverse
        doc, body = _relayout(doc, body, _tensor_names(doc))
        return join(doc, body)
    else:
        other = _pick(rng, doc)
        new = other if other is not None else name
    doc[new] = info
    return join(doc, body)


def m_json_text(rng, data, seeds):
    """Mutations only visible in the header's text: duplicates, whitespace, giant numbers, nesting."""
    (n,) = struct.unpack("<Q", data[:8])
    text, body = data[8 : 8 + n], data[8 + n :]
    choice = rng.randrange(9)
    if choice == 0:
        new = b" \n\t" + text
    elif choice == 1:  # duplicate the first tensor record (same key twice)
        doc, _ = split(data)
        name = _pick(rng, doc)
        if name is None:
            return data
        rec = json.dumps({name: doc[name]}, separators=(",", ":")).encode()[1:-1]
        new = b"{" + rec + b"," + text.lstrip()[1:]
    elif choice == 2:
        new = text.replace(b"[", b"[" + b"9" * rng.choice([20, 400, 5000]) + b",", 1)
    elif choice == 3:
        depth = rng.choice([100, 1000, 100_000])
        new = b'{"x":' + b"[" * depth + b"]" * depth + b"," + text.lstrip()[1:]
    elif choice == 4:
        new = b"\xef\xbb\xbf" + text
    elif choice == 5:
        new = text.rstrip() + b"garbage"
    elif choice == 6:
        new = text.replace(b":", b':NaN,"y":', 1)
    elif choice == 7:
        new = text.replace(b'"', b"'", rng.choice([1, 2, 1000]))
    else:
        new = rng.choice([b"", b"{}", b"[]", b"null", b"1", b'"s"', b"{" * 10, b"\x00" * 16, b"\xff" * 16])
    return struct.pack("<Q", len(new)) + new + body


def m_values(rng, data, seeds):
    """Plausible headers over implausible tensor values: NaN/Inf scales, invalid deltadq parameters."""
    doc, body = split(data)
    candidates = [n for n in _tensor_names(doc) if n.endswith((".scale", ".dq_step", ".dq_params"))]
    if not candidates:
        return data
    name = rng.choice(candidates)
    begin, end = doc[name]["data_offsets"]
    if end <= begin:
        return data
    out = bytearray(body)
    if name.endswith(".dq_params"):
        values = [rng.choice([0, 1, 4, 8, 9, 16, -1, 2**31 - 1, -(2**31)]) for _ in range(3)]
        out[begin:end] = struct.pack("<3i", *values)
    else:
        i = begin + 4 * rng.randrange((end - begin) // 4)
        out[i : i + 4] = struct.pack(
            "<f", rng.choice([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e38, 1e-45])
        )
    return data[: len(data) - len(body)] + bytes(out)


def m_relayout(rng, data, seeds):
    """Tensors in another order, possibly with a gap, an overlap or trailing bytes (only the order
    is valid)."""
    doc, body = split(data)
    names = _tensor_names(doc)
    rng.shuffle(names)
    doc, body = _relayout(doc, body, names)
    choice = rng.randrange(4)
    if choice == 1 and names:
        name = rng.choice(names)
        doc[name]["data_offsets"] = [o + 1 for o in doc[name]["data_offsets"]]
    elif choice == 2:
        body += b"\x00" * rng.choice([1, 8])
    elif choice == 3 and len(names) > 1:
        a, b = rng.sample(names, 2)
        doc[a]["data_offsets"], doc[b]["data_offsets"] = doc[b]["data_offsets"], doc[a]["data_offsets"]
    return join(doc, body, pad=rng.random() < 0.8)


def m_splice(rng, data, seeds):
    other = rng.choice(list(seeds.values()))
    doc, _ = split(data)
    _, body = split(other)
    return join(doc, body)


MUTATORS: list[Callable] = [
    m_truncate,
    m_extend,
    m_flip_bits,
    m_flip_header,
    m_flip_body,
    m_random_bytes,
    m_header_length,
    m_header_bomb,
    m_offsets,
    m_shape,
    m_dtype,
    m_entry,
    m_metadata,
    m_names,
    m_json_text,
    m_values,
    m_relayout,
    m_splice,
]


def mutate(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    """One to three mutators in a row; structural mutators need a parseable file, so a chain
    stops at the first mutant that no longer parses."""
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        try:
            data = rng.choice(MUTATORS)(rng, data, seeds)
        except (
            ValueError,
            KeyError,
            TypeError,
            IndexError,
            AttributeError,
            struct.error,
            UnicodeError,
            RecursionError,
        ):
            break  # the previous mutant is no longer a parseable container: stop mutating it
        if len(data) < 8:
            break
    return data


# --- the oracle ------------------------------------------------------------------------------
def _header_prefix(data: bytes) -> bytes:
    if len(data) < 8:
        return data
    (n,) = struct.unpack("<Q", data[:8])
    return data[: 8 + min(n, MAX_HEADER_SIZE)]


def check_delta(data: bytes, path: Path) -> str:
    """Run the reader on `data` (written to `path`); returns "accepted" or "rejected", raises
    FuzzFailure when the oracle is broken."""
    path.write_bytes(data)
    try:
        with deadline(CASE_TIMEOUT):
            try:
                delta = DeltaFile.open(path)
                refusal = None
            except InvalidDeltaError as exc:
                delta, refusal = None, exc
            try:
                validate_delta_header(_header_prefix(data), len(data))
                header_refusal = None
            except InvalidDeltaError as exc:
                header_refusal = exc
            if (
                delta is None
                and header_refusal is None
                and not any(s in str(refusal) for s in VALUE_REFUSALS)
            ):
                raise FuzzFailure(
                    f"header check accepted what the reader refused for a non-value reason: {refusal}"
                )
            if delta is not None and header_refusal is not None:
                raise FuzzFailure(f"reader accepted what the header check refused: {header_refusal}")
            if delta is not None:
                round_trip(delta, data, path)
    except (FuzzFailure, Hang):
        raise
    except Exception as exc:  # anything but the codec's own errors is a crash
        raise FuzzFailure(f"crash: {type(exc).__name__}: {exc}") from exc
    return "accepted" if delta is not None else "rejected"


def _stock_dtypes() -> dict:
    import torch

    return {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "F8_E5M2": torch.float8_e5m2,
        "F8_E4M3": torch.float8_e4m3fn,
        "I16": torch.int16,
        "U16": torch.uint16,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I32": torch.int32,
        "U32": torch.uint32,
        "F32": torch.float32,
        "I64": torch.int64,
        "U64": torch.uint64,
        "F64": torch.float64,
    }


STOCK_DTYPES: dict = {}


def round_trip(delta: DeltaFile, data: bytes, path: Path) -> None:
    import torch
    from safetensors import safe_open

    if not STOCK_DTYPES:
        STOCK_DTYPES.update(_stock_dtypes())
    header = delta.header
    # 1. the stock library loads exactly what we accepted
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}) != header.metadata:
            raise FuzzFailure(f"stock metadata {f.metadata()} != ours {header.metadata}")
        if set(f.keys()) != set(header.tensors):
            raise FuzzFailure(f"stock tensor names {sorted(f.keys())} != ours {sorted(header.tensors)}")
        for name, entry in header.tensors.items():
            t = f.get_tensor(name)
            if STOCK_DTYPES[entry.dtype] != t.dtype:
                raise FuzzFailure(f"{name}: stock dtype {t.dtype} != {entry.dtype}")
            if tuple(t.shape) != entry.shape:
                raise FuzzFailure(f"{name}: stock shape {tuple(t.shape)} != {entry.shape}")
            got = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            if got != data[entry.start : entry.end]:
                raise FuzzFailure(f"{name}: stock bytes differ from the bytes at our offsets")
    # 2. our writer re-encodes the header to the same tensors and metadata
    ordered = sorted(header.tensors.values(), key=lambda e: (e.start, e.end))
    again = (
        encode_header([TensorSpec(e.name, e.dtype, e.shape) for e in ordered], header.metadata)
        + data[header.data_start :]
    )
    reparsed, entries = validate_delta_header(_header_prefix(again), len(again))
    if reparsed.metadata != header.metadata:
        raise FuzzFailure("re-encoded metadata differs")
    for e in ordered:
        r = reparsed.tensors[e.name]
        if (r.dtype, r.shape, r.start - reparsed.data_start, r.end - reparsed.data_start) != (
            e.dtype,
            e.shape,
            e.start - header.data_start,
            e.end - header.data_start,
        ):
            raise FuzzFailure(f"{e.name}: re-encoded record differs")
    if set(entries) != set(delta.entries):
        raise FuzzFailure("re-encoded file groups into other entries")
    # 3. the registry's upload verification accepts its storage form, with the same metadata
    from registry.server.verify import Declared, verify_stream

    blob = zstandard.ZstdCompressor(write_content_size=True).compress(data)
    declared = Declared(_sha(blob), len(blob), _sha(data), len(data))
    verified = verify_stream(io.BytesIO(blob), declared, max_size=len(blob)).header
    if verified.metadata != header.metadata:
        raise FuzzFailure("registry verification read other metadata")


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- the storage form ------------------------------------------------------------------------
class _Unseekable(io.RawIOBase):
    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        chunk = self._buf.read(len(b))
        b[: len(chunk)] = chunk
        return len(chunk)


class _CappedSink:
    def __init__(self, cap: int):
        self.cap, self.n, self.sha = cap, 0, hashlib.sha256()

    def write(self, buf) -> int:
        self.n += len(buf)
        if self.n > self.cap:
            raise FuzzFailure(f"decompressor wrote {self.n} bytes, above the cap of {self.cap}")
        self.sha.update(buf)
        return len(buf)


def mutate_blob(rng: random.Random, blob: bytes) -> bytes:
    choice = rng.randrange(6)
    if choice == 0:
        return blob[: rng.randrange(len(blob))]
    if choice == 1:
        return blob + rng.choice(
            [blob, b"\x00", rng.randbytes(16), zstandard.ZstdCompressor().compress(b"x")]
        )
    if choice == 2:
        return m_flip_bits(rng, blob, {})
    if choice == 3:  # the frame header's content size rewritten (a lying or absent size)
        out = bytearray(blob)
        for i in range(4, min(len(out), 14)):
            if rng.random() < 0.3:
                out[i] = rng.randrange(256)
        return bytes(out)
    if choice == 4:  # a frame without a declared size, or declaring far more than it holds
        raw = rng.randbytes(rng.choice([10, 1000])) * rng.choice([1, 1000])
        return zstandard.ZstdCompressor(write_content_size=rng.random() < 0.5).compress(raw)
    return m_random_bytes(rng, blob, {})


def check_blob(blob: bytes, raw: bytes) -> str:
    """Decompress a (possibly mutated) storage form with the record's cap and digest, seekable
    and not, and through the registry's verification; returns "accepted" or "rejected"."""
    from registry.common.errors import DigestMismatchError, InvalidUploadError
    from registry.server.verify import Declared, verify_stream

    outcomes = set()
    try:
        with deadline(CASE_TIMEOUT):
            for src in (io.BytesIO(blob), io.BufferedReader(_Unseekable(blob))):
                sink = _CappedSink(len(raw))
                try:
                    n, digest = decompress_stream(
                        src, sink, max_output_size=len(raw), expected_raw_digest=_sha(raw)
                    )
                except InvalidDeltaError:
                    outcomes.add("rejected")
                    continue
                if (n, digest) != (len(raw), _sha(raw)):
                    raise FuzzFailure("decompress_stream returned other bytes than the original")
                outcomes.add("accepted")
            # an uploader declaring the digest of whatever it sent, and the original raw values
            declared = Declared(_sha(blob), len(blob), _sha(raw), len(raw))
            try:
                verify_stream(io.BytesIO(blob), declared, max_size=len(blob))
                outcomes.add("accepted")
            except (DigestMismatchError, InvalidUploadError):
                outcomes.add("rejected")
    except (FuzzFailure, Hang):
        raise
    except Exception as exc:
        raise FuzzFailure(f"crash: {type(exc).__name__}: {exc}") from exc
    if len(outcomes) != 1:
        raise FuzzFailure(f"readers disagree on the same bytes: {outcomes}")
    return outcomes.pop()
