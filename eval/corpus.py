"""A real text corpus every machine has: the Python standard library's own sources, split
deterministically into train and held-out by a hash of each file's relative path, and the
held-out windows the fidelity evaluation scores."""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from pathlib import Path

SKIP_PARTS = {
    "test",
    "tests",
    "idlelib",
    "encodings",
    "lib2to3",
    "ensurepip",
    "turtledemo",
    "site-packages",
    "__pycache__",
}
HELDOUT_PERCENT = 5


def stdlib_files() -> list[Path]:
    return list(_stdlib_files())


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_PARTS.intersection(rel.parts):
            continue
        files.append(path)
    return tuple(files)


def split_of(path: Path) -> str:
    rel = path.relative_to(Path(sysconfig.get_paths()["stdlib"])).as_posix()
    bucket = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:4], "little") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def texts(split: str) -> list[str]:
    """Source texts of one split ("train" or "heldout"), in a stable order."""
    return list(_texts(split))


@functools.lru_cache(maxsize=2)
def _texts(split: str) -> tuple[str, ...]:
    out = []
    for path in stdlib_files():
        if split_of(path) == split:
            try:
                out.append(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                continue
    return tuple(out)


def token_blocks(tokenizer, docs: list[str], seq_len: int, limit: int | None = None) -> list[list[int]]:
    """Concatenate documents (separated by EOS) and cut them into blocks of `seq_len` tokens."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    blocks: list[list[int]] = []
    buf: list[int] = []
    for doc in docs:
        buf.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        buf.append(eos)
        while len(buf) >= seq_len:
            blocks.append(buf[:seq_len])
            buf = buf[seq_len:]
            if limit is not None and len(blocks) >= limit:
                return blocks
    return blocks


def heldout_windows(tokenizer, count: int, seq_len: int) -> list[list[int]]:
    """`count` windows of `seq_len` tokens from the held-out split, spread evenly over all of its
    windows (so every held-out file is represented, not only the first in path order)."""
    if count < 1 or seq_len < 2:
        raise ValueError(f"need at least 1 window of at least 2 tokens, got {count} × {seq_len}")
    blocks = token_blocks(tokenizer, texts("heldout"), seq_len)
    if len(blocks) < count:
        raise ValueError(
            f"the held-out split has {len(blocks)} windows of {seq_len} tokens, fewer than the "
            f"{count} asked for (raise HELDOUT_PERCENT in eval/corpus.py, or ask for fewer)"
        )
    return [blocks[i * len(blocks) // count] for i in range(count)]
