"""Calibration text for scale distillation: a text file, a directory of text files, or JSONL
with a `text` field — read, checked (non-empty, really text) and fingerprinted."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CalibrationDataError

TEXT_SUFFIXES = {
    ".txt",
    ".md",
    ".py",
    ".rst",
    ".json",
    ".jsonl",
    ".csv",
    ".tsv",
    ".html",
    ".xml",
    ".yaml",
    ".yml",
    "",
}
MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class CalibrationText:
    documents: list[str]
    fingerprint: str  # sha256 of the documents as read (order-sensitive)
    source: str


def _decode(path: Path, raw: bytes) -> str:
    if b"\x00" in raw:
        raise CalibrationDataError(f"{path}: contains NUL bytes; calibration data must be text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationDataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _jsonl(path: Path, text: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise CalibrationDataError(f"{path}:{lineno}: not a JSON object") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationDataError(f"{path}:{lineno}: JSONL records need a string 'text' field")
        docs.append(record["text"])
    return docs


def read_calibration_text(source: str | os.PathLike[str]) -> CalibrationText:
    """Read calibration documents from `source`; raise CalibrationDataError with the reason."""
    path = Path(source)
    if not path.exists():
        raise CalibrationDataError(f"{path}: no such file or directory")
    files = (
        sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if path.is_dir()
        else [path]
    )
    if not files:
        raise CalibrationDataError(f"{path}: directory holds no text files")
    docs: list[str] = []
    total = 0
    h = hashlib.sha256()
    for f in files:
        raw = f.read_bytes()
        total += len(raw)
        if total > MAX_BYTES:
            raise CalibrationDataError(f"{path}: more than {MAX_BYTES} bytes of calibration data")
        text = _decode(f, raw)
        new = _jsonl(f, text) if f.suffix == ".jsonl" else [text]
        for doc in new:
            if doc.strip():
                docs.append(doc)
                h.update(doc.encode("utf-8") + b"\x00")
    if not docs:
        raise CalibrationDataError(f"{path}: calibration data is empty")
    return CalibrationText(docs, "sha256:" + h.hexdigest(), str(path))
