"""A version's per-tensor summary for its page: how many tensors are binarized, DeltaDQ-coded or
kept dense and their bytes, read from the stored blob's header (only its first bytes are
decompressed) and remembered per digest, since stored bytes never change."""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

from registry.server.blobstores import BlobStore
from registry.server.models import Blob
from registry.server.verify import read_header

log = logging.getLogger("deltastore.registry.web")


@dataclass(frozen=True)
class KindSummary:
    kind: str  # "bitdelta", "deltadq" or "full"
    label: str
    tensors: int
    bytes: int
    elements: int  # weights covered (bitdelta: upper bound, rows may end in padding; deltadq: 0, unknown)


@dataclass(frozen=True)
class TensorSummary:
    kinds: list[KindSummary]
    tensors: int
    planes: list[int]  # distinct plane counts of the binarized tensors
    scale_modes: list[str]  # "per-matrix" / "per-row"
    largest: list[tuple[str, str, int]]  # (name, kind, bytes) of the biggest tensors

    def covered(self) -> int | None:
        """Weights of the base the delta replaces (upper bound); None when DeltaDQ tensors make it unknown."""
        if any(k.kind == "deltadq" for k in self.kinds):
            return None
        return sum(k.elements for k in self.kinds)


_LABELS = {"bitdelta": "binarized (sign + scale)", "deltadq": "DeltaDQ codes", "full": "kept dense (.full)"}


def summarize_entries(entries: dict) -> TensorSummary:
    counts: dict[str, list[int]] = {kind: [0, 0, 0] for kind in _LABELS}
    planes, modes = set(), set()
    for entry in entries.values():
        kind = entry.kind
        stats = counts[kind]
        stats[0] += 1
        stats[1] += entry.nbytes
        if kind == "full":
            stats[2] += _prod(entry.full.shape)
        elif kind == "bitdelta":
            _, out, packed = entry.sign.shape
            stats[2] += out * packed * 8
            planes.add(entry.planes)
            modes.add("per-row" if entry.per_row else "per-matrix")
        # DeltaDQ: how many weights a row holds is in the tensor bytes (dq_params), not the header
    largest = sorted(((e.name, e.kind, e.nbytes) for e in entries.values()), key=lambda t: (-t[2], t[0]))[:5]
    kinds = [KindSummary(kind, _LABELS[kind], *counts[kind]) for kind in _LABELS if counts[kind][0]]
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
