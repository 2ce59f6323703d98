"""Host staging of a delta: its tensors read (or decoded: DeltaDQ masks, low-rank factors) into one
host buffer (pinned when the pool is on CUDA) in the pool's slot layout, so installing it is plain copies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from codec.errors import InvalidDeltaError
from codec.format import DeltaFile
from codec.terms import DeltaDQTerm, LowRankTerm, SignTerm, Term, entry_terms

from .deltadq import DQSource, DQWeight
from .errors import DeltaDoesNotFitError
from .layout import words_per_row
from .pool_layout import PoolLayout, dtype_itemsize, shape_numel

_ALIGN = 64  # staging views start on cache-line boundaries (and on any element size)


@dataclass
class StagedDelta:
    """A delta read into (pinned, on CUDA) host memory in the pool's slot layout, ready to copy."""

    key: str
    info: dict
    words: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    tables: dict[str, torch.Tensor]
    dense: dict[str, torch.Tensor]
    nbytes: int
    _arena: torch.Tensor | None = field(default=None, repr=False)
    dq: dict[str, DQWeight] = field(default_factory=dict)
    lowrank: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (a, b)

    @property
    def dense_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.dense.values())

    @property
    def dq_bytes(self) -> int:
        return sum(w.nbytes for w in self.dq.values())

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.lowrank.values()), default=0)

    @property
    def room_bytes(self) -> int:
        """Device bytes this delta needs beside the fixed slots (allocated per load)."""
        return self.dense_bytes + self.dq_bytes


class _HostArena:
    """One host buffer (pinned when CUDA is used) carved into aligned tensor views."""

    def __init__(self, specs: list[tuple[tuple[int, ...], torch.dtype]], pin: bool):
        self.offsets, total = [], 0
        for shape, dtype in specs:
            total = -(-total // _ALIGN) * _ALIGN
            self.offsets.append(total)
            total += shape_numel(shape) * dtype_itemsize(dtype)
        self.buffer = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pin)
        self.specs = specs

    def views(self) -> list[torch.Tensor]:
        out = []
        for off, (shape, dtype) in zip(self.offsets, self.specs, strict=True):
            n = shape_numel(shape) * dtype_itemsize(dtype)
            out.append(self.buffer[off : off + n].view(dtype).view(shape))
        return out


class _Lazy(Mapping):
    """Name -> tensor, read from the delta file only when the stager asks for it."""

    def __init__(self, getter, names: Mapping[str, object]):
        self._getter, self._names = getter, list(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._getter(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def stage_tensors(
    layout: PoolLayout,
    key: str,
    *,
    sign: Mapping[str, torch.Tensor],
    scale: Mapping[str, torch.Tensor],
    full: Mapping[str, torch.Tensor] | None = None,
    dq: Mapping[str, DQSource | DQWeight] | None = None,
    lowrank: Mapping[str, LowRankTerm] | None = None,
    info: dict | None = None,
    pin: bool = False,
) -> StagedDelta:
    """Stage in-memory tensors in the file's layout (sign uint8 [P, out, ceil(in/8)], scale
    f32 [P, 1|out], full tensors), DeltaDQ tensors (sources whose mask is decoded into the
    staging buffer, or ready `DQWeight`s) and low-rank terms (factors decoded and cast to the
    pool's factor dtype) — the path `stage_file` takes after reading a file; `pin` allocates the
    buffer in pinned memory (for async copies to CUDA)."""
    lay = layout
    full = full if full is not None else {}
    dq = dq if dq is not None else {}
    lowrank = lowrank if lowrank is not None else {}
    check_ranks(lay, lowrank)
    factors = {name: _checked_factors(lay, name, term) for name, term in lowrank.items()}
    specs: list[tuple[tuple[int, ...], torch.dtype]] = []
    for name in sign:
        out, inn = lay.sign[name]
        specs += [((lay.planes, out, words_per_row(inn)), torch.int32), ((lay.planes, out), torch.float32)]
    tables = [n for n in full if n in lay.table]
    denses = [n for n in full if n not in lay.table]
    specs += [lay.table[n] for n in tables] + [lay.dense[n] for n in denses]
    for name in dq:
        w = dq[name]
        shapes = w.payload_shapes() if isinstance(w, DQSource) else [t.shape for t in w.tensors()]
        specs += list(zip(shapes, (torch.int32, torch.uint8, torch.float32), strict=True))
    for a, b in factors.values():
        specs += [(tuple(a.shape), lay.factor_dtype), (tuple(b.shape), lay.factor_dtype)]
    arena = _HostArena(specs, pin=pin)
    views = iter(arena.views())
    words, scales, tabs, dense = {}, {}, {}, {}
    for name in sign:
        w, s = next(views), next(views)
        sg, sc = sign[name], scale[name]
        planes, _, nb = sg.shape
        wb = w.view(torch.uint8)  # [P_pool, out, 4W], little-endian words
        wb[:planes, :, :nb].copy_(sg)
        wb[:planes, :, nb:].zero_()
        wb[planes:].zero_()
        s[:planes].copy_(sc.to(torch.float32).expand(planes, s.shape[1]))
        s[planes:].zero_()
        words[name], scales[name] = w, s
    for name in tables:
        tabs[name] = next(views).copy_(full[name])
    for name in denses:
        dense[name] = next(views).copy_(full[name])
    dqs = {}
    for name, src in dq.items():
        mask, codes, step = next(views), next(views), next(views)
        if isinstance(src, DQSource):
            p = src.params
            dqs[name] = DQWeight(mask, codes, step, p.bits, p.kept_per_row(src.shape[1]), src.shape[1])
            src.fill(dqs[name])
        else:
            dqs[name] = src.replace(mask.copy_(src.mask), codes.copy_(src.codes), step.copy_(src.step))
    staged_factors = {}
    for name, (a, b) in factors.items():
        staged_factors[name] = (next(views).copy_(a), next(views).copy_(b))
    return StagedDelta(
        key=key,
        info=dict(info or {}),
        words=words,
        scales=scales,
        tables=tabs,
        dense=dense,
        nbytes=int(arena.buffer.numel()),
        _arena=arena.buffer,
        dq=dqs,
        lowrank=staged_factors,
    )


def _checked_factors(layout: PoolLayout, name: str, term: LowRankTerm) -> tuple[torch.Tensor, torch.Tensor]:
    """The term's factors (a [rank, in], b [out, rank]) cast to the pool's factor dtype, after the
    checks a slot needs: a tensor the pool patches, shapes, a rank within `max_rank`, finite values."""
    if name not in layout.sign:
        raise DeltaDoesNotFitError(
            f"{name}: a low-rank delta on a tensor of a module the loader does not patch (only "
            "nn.Linear and nn.Embedding weights carry compressed deltas)"
        )
    a, b = term.factors()
    out, inn = layout.sign[name]
    r = term.rank
    if tuple(a.shape) != (r, inn) or tuple(b.shape) != (out, r):
        raise InvalidDeltaError(
            f"{name}: low-rank factors of rank {r} must be a [{r}, {inn}] and b [{out}, {r}], "
            f"got a {list(a.shape)} and b {list(b.shape)}"
        )
    cast = a.to(layout.factor_dtype), b.to(layout.factor_dtype)
    for label, src, dst in (("a", a, cast[0]), ("b", b, cast[1])):
        if not bool(torch.isfinite(dst).all()):
            finite = bool(torch.isfinite(src).all())
            what = f"overflow {layout.factor_dtype}" if finite else "are not finite"
            raise InvalidDeltaError(f"{name}: low-rank factor {label} values {what}")
    return cast


def check_ranks(layout: PoolLayout, terms: Mapping[str, LowRankTerm]) -> None:
    """Refuse low-rank terms of a rank below 1, or above what the slots have room for (naming the
    highest rank, so the max_rank the message asks for takes every tensor)."""
    for name, t in terms.items():
        if t.rank < 1:
            raise InvalidDeltaError(f"{name}: low-rank term of rank {t.rank}; a rank must be >= 1")
    name = max(terms, key=lambda n: terms[n].rank, default=None)
    if name is not None and terms[name].rank > layout.max_rank:
        rank = terms[name].rank
        raise DeltaDoesNotFitError(
            f"{name} has a low-rank term of rank {rank} but the slot pool holds factors up to rank "
            f"{layout.max_rank}; create the DeltaModel with max_rank={rank} (or more)"
        )


# ---------------------------------------------------------------------------------------
# loading


@dataclass(frozen=True)
class DeltaTerms:
    """A delta file's tensors by the form the loader serves them in: the compressed ones by term
    (`codec.terms.entry_terms`: Δ̂ of a tensor is the sum of its terms, in `terms[name]`'s order)
    and the `.full` ones, which replace the base tensor."""

    terms: dict[str, tuple[Term, ...]]
    sign: dict[str, SignTerm]
    dq: dict[str, DeltaDQTerm]
    lowrank: dict[str, LowRankTerm]
    full: tuple[str, ...]


def delta_terms(delta: DeltaFile) -> DeltaTerms:
    """Split every tensor of `delta` into its terms; a tensor may combine forms (low-rank factors
    plus sign planes of the residual) but holds at most one term of each form, since a slot has
    one place per form and tensor."""
    terms, sign, dq, lowrank, full = {}, {}, {}, {}, []
    for name in delta.entries:
        ts = entry_terms(delta, name)
        if not ts:
            if delta.entries[name].full is not None:
                full.append(name)
            continue  # no terms and no replacement: Δ̂ = 0, nothing to serve
        terms[name] = ts
        for t in ts:
            into = {SignTerm: sign, DeltaDQTerm: dq, LowRankTerm: lowrank}.get(type(t))
            if into is None:
                raise DeltaDoesNotFitError(f"{name}: the loader does not serve a {type(t).__name__} term")
            if name in into:
                raise DeltaDoesNotFitError(
                    f"{name}: {sum(isinstance(u, type(t)) for u in ts)} {type(t).__name__} terms; a slot "
                    "holds at most one term of each form per tensor"
                )
            into[name] = t
    return DeltaTerms(terms, sign, dq, lowrank, tuple(full))


def sign_planes(delta: DeltaFile, term: SignTerm) -> int:
    """Bit-planes of a sign term, from the file's header (nothing read)."""
    return int(delta.header.tensors[term.sign_key].shape[0])


def stage_file(
    layout: PoolLayout, delta: DeltaFile, path: str | Path, *, key: str, pin: bool = False
) -> StagedDelta:
    """Read an opened, validated delta file (opened from `path`) into host memory in slot layout
    (`stage_tensors`); sign, scale and full tensors are read from the file only as the stager
    reaches them."""
    split = delta_terms(delta)
    signs = split.sign
    dqs = {n: DQSource(delta, t.name, layout.sign[n]) for n, t in split.dq.items()}
    headers = delta.header.tensors
    info = {
        "path": str(path),
        "base_model": delta.base_model,
        "dtype": delta.dtype_name,
        "codec": delta.codec,
        "planes": max((sign_planes(delta, t) for t in signs.values()), default=0),
        "per_row": any(headers[t.scale_key].shape[1] != 1 for t in signs.values()),
        "rank": max((t.rank for t in split.lowrank.values()), default=0),
        "file_bytes": Path(path).stat().st_size,
    }
    return stage_tensors(
        layout,
        key,
        sign=_Lazy(lambda n: delta.tensor(signs[n].sign_key), signs),
        scale=_Lazy(lambda n: delta.tensor(signs[n].scale_key), signs),
        full=_Lazy(delta.full, dict.fromkeys(split.full)),
        dq=dqs,
        lowrank=split.lowrank,
        info=info,
        pin=pin,
    )
