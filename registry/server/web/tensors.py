"""A version's per-tensor summary for its page: how many tensors each codec encodes or are kept
dense and their bytes, read from the stored blob's header (only its first bytes are
decompressed) and remembered per digest, since stored bytes never change."""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

from codec import codecs
from registry.server.blobstores import BlobStore
from registry.server.models import Blob
from registry.server.verify import read_header

log = logging.getLogger("deltastore.registry.web")


@dataclass(frozen=True)
class KindSummary:
    kind: str  # a codec's name (codec/codecs/) or "full"
    label: str
    tensors: int
    bytes: int
    elements: int | None  # weights covered (an upper bound: rows may end in padding); None: not in the header


@dataclass(frozen=True)
class TensorSummary:
    kinds: list[KindSummary]
    tensors: int
    planes: list[int]  # distinct plane counts of the binarized tensors
    scale_modes: list[str]  # "per-matrix" / "per-row"
    largest: list[tuple[str, str, int]]  # (name, kind, bytes) of the biggest tensors

    def covered(self) -> int | None:
        """Weights of the base the delta replaces (upper bound); None when some codec's tensors
        (DeltaDQ's) hold their width in the tensor bytes, not the header."""
        if any(k.elements is None for k in self.kinds):
            return None
        return sum(k.elements for k in self.kinds)


def _label(kind: str) -> str:
    return "kept dense (.full)" if kind == "full" else codecs.get(kind).label


def summarize_entries(entries: dict) -> TensorSummary:
    counts: dict[str, list] = {}
    planes, modes = set(), set()
    for entry in entries.values():
        kind = entry.kind
        stats = counts.setdefault(kind, [0, 0, 0])
        stats[0] += 1
        stats[1] += entry.nbytes
        covered = _prod(entry.full.shape) if kind == "full" else codecs.get(kind).covered_weights(entry)
        stats[2] = None if covered is None or stats[2] is None else stats[2] + covered
        if entry.sign is not None:  # sign planes (BitDelta's, or another codec's that stores them)
            planes.add(entry.planes)
            modes.add("per-row" if entry.per_row else "per-matrix")
    largest = sorted(((e.name, e.kind, e.nbytes) for e in entries.values()), key=lambda t: (-t[2], t[0]))[:5]
    order = [*codecs.names(), "full"]
    kinds = [KindSummary(kind, _label(kind), *counts[kind]) for kind in order if kind in counts]
    return TensorSummary(
        kinds=kinds, tensors=len(entries), planes=sorted(planes), scale_modes=sorted(modes), largest=largest
    )


def _prod(shape) -> int:
    return functools.reduce(lambda a, b: a * b, shape, 1)


class TensorSummaries:
    """An LRU of summaries by blob digest (content-addressed, so never stale)."""

    def __init__(self, size: int = 256):
        self._size = size
        self._items: OrderedDict[str, TensorSummary] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, store: BlobStore, blob: Blob) -> TensorSummary:
        with self._lock:
            if blob.digest in self._items:
                self._items.move_to_end(blob.digest)
                return self._items[blob.digest]
        with store.open_blob(blob.store_key) as fh:
            _, entries = read_header(fh, blob.raw_size)
        summary = summarize_entries(entries)
        with self._lock:
            self._items[blob.digest] = summary
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return summary
