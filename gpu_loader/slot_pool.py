"""The delta slot pool's state machine: fixed device buffers allocated once (sizes from
`pool_layout`), slots that go free -> loading -> ready, LRU eviction of unpinned slots, pinning,
leases held by forwards, and installs of staged deltas (`staging`) on a side CUDA stream with
events, so a forward never reads a half-written slot.

Thread-safe: `load` may run on any thread while forwards lease slots on another.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from codec.format import DeltaFile
from codec.terms import DeltaDQTerm, LowRankTerm, SignTerm

from .deltadq import DQSource, DQWeight
from .errors import BudgetError, DeltaDoesNotFitError, NotLoadedError, SlotPoolFullError, StaleSlotError
from .layout import words_per_row
from .pool_layout import PoolLayout, slot_counts
from .segments import SlotView
from .sizes import format_size, parse_size
from .staging import StagedDelta, check_ranks, delta_terms, sign_planes, stage_file, stage_tensors

_FORM_NAMES = {SignTerm: "sign", DeltaDQTerm: "DeltaDQ", LowRankTerm: "low-rank"}


class SlotHandle(int):
    """The slot index `load()` returned; remembers which load it came from, so a forward given
    a handle whose delta was evicted since raises `StaleSlotError` instead of using another delta."""

    generation: int
    key: str

    def __new__(cls, index: int, generation: int, key: str) -> SlotHandle:
        obj = super().__new__(cls, index)
        obj.generation = generation
        obj.key = key
        return obj

    def __repr__(self) -> str:
        return f"SlotHandle({int(self)}, {self.key!r})"

    def __reduce__(self):
        return (SlotHandle, (int(self), self.generation, self.key))


_FREE, _LOADING, _READY = "free", "loading", "ready"


@dataclass
class _Slot:
    index: int
    state: str = _FREE
    key: str | None = None
    refs: set[str] = field(default_factory=set)
    generation: int = 0
    pinned: bool = False
    leases: int = 0
    last_used: int = 0
    unload_on_release: bool = False
    sign: frozenset[str] = frozenset()
    tables: frozenset[str] = frozenset()
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    dense_bytes: int = 0
    dq: dict[str, DQWeight] = field(default_factory=dict)
    dq_bytes: int = 0
    lowrank: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # views (a, b)
    info: dict = field(default_factory=dict)
    loaded_at: float = 0.0
    hits: int = 0
    ready_event: object = None  # torch.cuda.Event: the slot's copies are complete
    last_use_event: object = None  # torch.cuda.Event: the last forward that read the slot is complete
    streams_seen: set = field(default_factory=set)

    @property
    def room_bytes(self) -> int:
        return self.dense_bytes + self.dq_bytes

    def view(self) -> SlotView:
        return SlotView(
            self.index,
            self.sign,
            self.tables,
            dict(self.dense),
            max(self.info.get("planes", 1), 1),
            dict(self.dq),
            dict(self.lowrank),
        )


class SlotPool:
    """Fixed-size device buffers for up to `max_slots` deltas within `memory_budget`.

        pool = SlotPool(layout, device="cuda", max_slots=64, memory_budget="8GiB",
                        base_fingerprint=fp, base_specs=specs, base_tables=small_base_tensors)
        handle = pool.load("math.bdelta")          # validate, stage, evict LRU if full, copy
        slots = pool.acquire([handle, -1])          # lease for one forward (waits for the copy)
        ... forward ...
        pool.release(slots)

    By default every slot reserves sign space and the number of slots is
    `min(max_slots, budget // layout.slot_bytes)`. With `sign_slots=s` there are exactly
    `max_slots` slots of which only the first `s` reserve sign space; the others are table-only
    (`layout.table_slot_bytes`) and hold deltas without sign tensors (DeltaDQ). The budget left
    over is the room for what deltas bring beyond the fixed part, allocated per load: dense
    replacements (embeddings / lm_head kept dense) and DeltaDQ payloads.
    A load that finds every slot in use (leased by forwards or being loaded) waits up to
    `wait_timeout` seconds for one; when every slot is pinned it fails at once.
    """

    def __init__(
        self,
        layout: PoolLayout,
        *,
        device: torch.device | str,
        max_slots: int = 64,
        memory_budget: int | str = "8GiB",
        base_fingerprint: str | None = None,
        base_specs: Mapping[str, tuple[str, tuple[int, ...]]] | None = None,
        base_tables: Mapping[str, torch.Tensor] | None = None,
        wait_timeout: float = 30.0,
        sign_slots: int | None = None,
    ) -> None:
        self.layout = layout
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.budget = parse_size(memory_budget)
        self.base_fingerprint = base_fingerprint
        self.base_specs = dict(base_specs) if base_specs is not None else layout.base_specs()
        self._base_tables = dict(base_tables or {})
        missing = set(layout.table) - set(self._base_tables)
        if missing:
            raise ValueError(f"base_tables lacks {sorted(missing)[:3]}")

        counts = slot_counts(layout, self.budget, max_slots, sign_slots)
        n, n_sign = counts.slots, counts.sign_slots
        self.num_slots = n
        self.num_sign_slots = n_sign
        self.fixed_bytes = counts.fixed_bytes
        self.dense_budget = counts.room_bytes  # the room: dense tensors and DeltaDQ payloads
        self._allocate(n, n_sign)

        self.wait_timeout = wait_timeout
        self._lock = threading.RLock()
        self._freed = threading.Condition(self._lock)  # notified when a lease ends or a load finishes
        self._slots = [_Slot(i) for i in range(n)]
        self._by_key: dict[str, _Slot] = {}
        self._inflight: dict[str, Future] = {}
        self._tick = itertools.count(1)
        self._generation = itertools.count(1)
        self._dense_used = 0
        self._dq_used = 0
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.counters = {"loads": 0, "hits": 0, "evictions": 0, "stage_seconds": 0.0, "install_seconds": 0.0}

    # ---------------------------------------------------------------------------------------
    # allocation
    # ---------------------------------------------------------------------------------------
    def _allocate(self, n: int, n_sign: int) -> None:
        """Sign space for slots [0, n_sign), tables and active flags for all n slots."""
        lay, dev = self.layout, self.device
        try:
            self.words = {
                name: torch.zeros(n_sign, lay.planes, out, words_per_row(inn), dtype=torch.int32, device=dev)
                for name, (out, inn) in lay.sign.items()
            }
            self.scales = {
                name: torch.zeros(n_sign, lay.planes, out, dtype=torch.float32, device=dev)
                for name, (out, _) in lay.sign.items()
            }
            self._active = torch.zeros(n, max(len(lay.sign), 1), dtype=torch.int32, device=dev)
            self.tables = {
                name: torch.zeros(n, *shape, dtype=dtype, device=dev)
                for name, (shape, dtype) in lay.table.items()
            }
            # Low-rank factor space in every slot (padded to max_rank), and each slot's rank per tensor.
            self.lowrank_a, self.lowrank_b = {}, {}
            r, fdt = lay.max_rank, lay.factor_dtype
            if r:
                for name, (out, inn) in lay.sign.items():
                    self.lowrank_a[name] = torch.zeros(n, r, inn, dtype=fdt, device=dev)
                    self.lowrank_b[name] = torch.zeros(n, out, r, dtype=fdt, device=dev)
            self._ranks = torch.zeros(n, len(lay.sign) if lay.max_rank else 0, dtype=torch.int32, device=dev)
        except torch.OutOfMemoryError as exc:
            raise BudgetError(
                f"allocating {n} slots ({n_sign} with sign space of {format_size(lay.slot_bytes)}) on {dev} "
                f"failed ({exc}); lower memory_budget"
            ) from None
        self._sign_index = {name: i for i, name in enumerate(lay.sign)}
        self.active = {name: self._active[:, i] for name, i in self._sign_index.items()}
        self.lowrank_ranks = {name: self._ranks[:, i] for name, i in self._sign_index.items() if lay.max_rank}

    # ---------------------------------------------------------------------------------------
    # validation and staging (no lock: the slow part, done by the loading thread)
    # ---------------------------------------------------------------------------------------
    def check_fits(self, delta: DeltaFile) -> None:
        """Refuse (before any copy) a delta for another base or one the slots cannot hold."""
        delta.check_base(self.base_specs, self.base_fingerprint)
        lay = self.layout
        split = delta_terms(delta)
        for name, terms in split.terms.items():
            if name not in lay.sign:
                forms = " + ".join(_FORM_NAMES[type(t)] for t in terms)
                raise DeltaDoesNotFitError(
                    f"{name}: a {forms} delta on a tensor of a module the loader does not patch (only "
                    "nn.Linear and nn.Embedding weights carry compressed deltas)"
                )
        check_ranks(lay, split.lowrank)
        for name, t in split.sign.items():
            if self.num_sign_slots == 0:
                raise DeltaDoesNotFitError(
                    f"{delta.path.name}: {name} is a sign delta but no slot of this pool has sign space "
                    "(sign_slots=0); create the DeltaModel with sign_slots >= 1"
                )
            planes = sign_planes(delta, t)
            if planes > lay.planes:
                raise DeltaDoesNotFitError(
                    f"{delta.path.name}: {name} has {planes} bit-planes but the slot pool holds "
                    f"{lay.planes}; create the DeltaModel with max_planes={planes}"
                )
        for name in split.full:
            e = delta.entries[name]
            spec = lay.table.get(name) or lay.dense.get(name)
            if spec is None:
                raise DeltaDoesNotFitError(
                    f"{name}: the delta replaces it, but it belongs to a module the loader cannot "
                    "switch per slot (supported: linear/embedding weights, linear biases, norm weights)"
                )
            if tuple(e.full.shape) != tuple(spec[0]):
                raise DeltaDoesNotFitError(
                    f"{name}.full has shape {list(e.full.shape)} but the resident base has {list(spec[0])}: "
                    "a resized tensor (e.g. a grown vocabulary) cannot share a batch with the base"
                )

    def stage(self, path: str | Path, *, key: str | None = None) -> StagedDelta:
        """Open, validate and read a delta into host memory in slot layout."""
        t0 = time.perf_counter()
        delta = DeltaFile.open(path)
        self.check_fits(delta)
        try:
            staged = stage_file(self.layout, delta, path, key=key or str(Path(path).resolve()), pin=self._pin)
        finally:
            delta.close()
        with self._lock:
            self.counters["stage_seconds"] += time.perf_counter() - t0
        return staged

    def stage_tensors(
        self,
        key: str,
        *,
        sign: Mapping[str, torch.Tensor],
        scale: Mapping[str, torch.Tensor],
        full: Mapping[str, torch.Tensor] | None = None,
        dq: Mapping[str, DQSource | DQWeight] | None = None,
        lowrank: Mapping[str, LowRankTerm] | None = None,
        info: dict | None = None,
    ) -> StagedDelta:
        """Stage in-memory tensors in the file's layout (`staging.stage_tensors`), pinned when
        this pool is on CUDA."""
        return stage_tensors(
            self.layout,
            key,
            sign=sign,
            scale=scale,
            full=full,
            dq=dq,
            lowrank=lowrank,
            info=info,
            pin=self._pin,
        )

    @property
    def _pin(self) -> bool:
        return self.device.type == "cuda"

    # ---------------------------------------------------------------------------------------
    # loading
    # ---------------------------------------------------------------------------------------
    def load(self, path: str | Path, *, ref: str | None = None, lease: bool = False) -> SlotHandle:
        """Make the delta at `path` resident (a no-op if it is) and return its slot handle.

        Concurrent loads of one file share the work. With `lease=True` the slot is leased
        atomically with the lookup (release it with `release`)."""
        key = str(Path(path).resolve())
        while True:
            with self._lock:
                slot = self._by_key.get(key)
                if slot is not None and slot.state == _READY:
                    self.counters["hits"] += 1
                    slot.hits += 1
                    return self._handle(slot, ref, lease)
                fut = self._inflight.get(key)
                if fut is None:
                    fut = self._inflight[key] = Future()
                    owner = True
                else:
                    owner = False
            if not owner:
                fut.result()  # re-raises the loader's error; on success look the slot up again
                continue
            try:
                staged = self.stage(path, key=key)
                handle = self.install(staged, ref=ref)
                fut.set_result(True)
                return handle
            except BaseException as exc:
                fut.set_exception(exc)
                raise
            finally:
                with self._lock:
                    self._inflight.pop(key, None)

    def install(self, staged: StagedDelta, *, ref: str | None = None) -> SlotHandle:
        """Copy a staged delta into a slot (evicting the least recently used unpinned one when
        full) on the side stream; the slot becomes visible once its copies are enqueued, and
        forwards wait on its ready event."""
        t0 = time.perf_counter()
        need_dense, need_dq = staged.dense_bytes, staged.dq_bytes
        need = need_dense + need_dq
        what = " and ".join(w for w, b in (("dense tensors", need_dense), ("DeltaDQ payload", need_dq)) if b)
        with self._lock:
            if need > self.dense_budget:
                raise SlotPoolFullError(
                    f"the delta's {what} need {format_size(need)} but the budget leaves "
                    f"{format_size(self.dense_budget)} beside the fixed slots; raise memory_budget, or lower "
                    "max_slots (or sign_slots)"
                )
            slot = self._take_slot(time.monotonic() + self.wait_timeout, needs_sign=bool(staged.words))
            while self._dense_used + self._dq_used + need > self.dense_budget:
                victim = self._lru(lambda s: s.room_bytes > 0)
                if victim is None:
                    self._release_slot_to_free(slot)
                    raise SlotPoolFullError(
                        f"no room for {format_size(need)} of {what}: the deltas holding "
                        "the rest of the budget are pinned or in use"
                    )
                self._evict(victim)
                victim.state = _FREE
            self._dense_used += need_dense
            self._dq_used += need_dq
            slot.state = _LOADING
            slot.dense_bytes, slot.dq_bytes = need_dense, need_dq
        try:
            self._copy_into(slot, staged)
        except BaseException:
            with self._lock:
                self._dense_used -= need_dense
                self._dq_used -= need_dq
                slot.dense, slot.dense_bytes, slot.dq, slot.dq_bytes = {}, 0, {}, 0
                slot.lowrank = {}
                self._release_slot_to_free(slot)
                self._freed.notify_all()
            raise
        with self._lock:
            old = self._by_key.get(staged.key)
            if old is not None and old is not slot:  # the same delta staged twice: keep the new copy
                if old.leases:
                    old.unload_on_release = True
                    del self._by_key[staged.key]
                else:
                    self._evict(old)
                    old.state = _FREE
            slot.state = _READY
            slot.key = staged.key
            slot.generation = next(self._generation)
            slot.sign = frozenset(staged.words)
            slot.tables = frozenset(staged.tables)
            slot.info = dict(staged.info, bytes=staged.nbytes)
            slot.loaded_at = time.time()
            slot.last_used = next(self._tick)
            slot.hits = 0
            self._by_key[staged.key] = slot
            self.counters["loads"] += 1
            self.counters["install_seconds"] += time.perf_counter() - t0
            self._freed.notify_all()
            return self._handle(slot, ref, False)

    def _copy_into(self, slot: _Slot, staged: StagedDelta) -> None:
        i = slot.index
        stream = self._copy_stream
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            if stream is not None and slot.last_use_event is not None:
                stream.wait_event(slot.last_use_event)  # forwards still reading the old delta
            nb = stream is not None
            for name, w in staged.words.items():
                self.words[name][i].copy_(w, non_blocking=nb)
                self.scales[name][i].copy_(staged.scales[name], non_blocking=nb)
            flags = torch.zeros(self._active.shape[1], dtype=torch.int32, pin_memory=nb)
            for name in staged.words:
                flags[self._sign_index[name]] = 1
            self._active[i].copy_(flags, non_blocking=nb)
            for name, table in self.tables.items():
                src = staged.tables.get(name)
                table[i].copy_(src if src is not None else self._base_tables[name], non_blocking=nb)
            slot.dense = {}
            for name, t in staged.dense.items():
                d = torch.empty(t.shape, dtype=t.dtype, device=self.device)
                d.copy_(t, non_blocking=nb)
                slot.dense[name] = d
            slot.dq = {name: w.to(self.device, non_blocking=nb) for name, w in staged.dq.items()}
            slot.lowrank = {}
            if self.layout.max_rank:
                ranks = torch.zeros(self._ranks.shape[1], dtype=torch.int32, pin_memory=nb)
                for name, (a, b) in staged.lowrank.items():
                    r = a.shape[0]
                    da, db = self.lowrank_a[name][i, :r], self.lowrank_b[name][i, :, :r]
                    da.copy_(a, non_blocking=nb)
                    db.copy_(b, non_blocking=nb)
                    ranks[self._sign_index[name]] = r
                    slot.lowrank[name] = (da, db)
                self._ranks[i].copy_(ranks, non_blocking=nb)
            if stream is not None:
                ev = torch.cuda.Event()
                ev.record(stream)
                slot.ready_event = ev
                slot.streams_seen = set()

    def _take_slot(self, deadline: float, needs_sign: bool = True) -> _Slot:
        """A free slot, else the least recently used evictable one; waits (lock released) while
        the only candidates are leased or loading. A delta with sign tensors needs a slot with
        sign space; one without prefers a free table-only slot. Called with the lock held."""
        n_sign = self.num_sign_slots
        cands = self._slots[:n_sign] if needs_sign else self._slots[n_sign:] + self._slots[:n_sign]
        while True:
            for s in cands:
                if s.state == _FREE:
                    s.state = _LOADING
                    return s
            victim = self._lru(lambda s: s.index < n_sign or not needs_sign)
            if victim is not None:
                self._evict(victim)
                victim.state = _LOADING
                return victim
            pinned = sum(s.pinned for s in cands)
            remaining = deadline - time.monotonic()
            if pinned == len(cands) or remaining <= 0:
                kind = "slots with sign space" if needs_sign and n_sign < self.num_slots else "slots"
                raise SlotPoolFullError(
                    f"all {len(cands)} {kind} are busy ({pinned} pinned, the rest in use by forwards "
                    "or loading); unpin or unload a delta, or raise max_slots / memory_budget"
                )
            self._freed.wait(remaining)

    def _lru(self, pred) -> _Slot | None:
        cands = [s for s in self._slots if s.state == _READY and not s.pinned and s.leases == 0 and pred(s)]
        return min(cands, key=lambda s: s.last_used) if cands else None

    def _evict(self, slot: _Slot) -> None:
        """Forget the slot's delta (the buffers are overwritten by the next install)."""
        if slot.key is not None and self._by_key.get(slot.key) is slot:
            del self._by_key[slot.key]
        self._dense_used -= slot.dense_bytes
        self._dq_used -= slot.dq_bytes
        # freed after in-flight reads (record_stream in acquire)
        slot.dense, slot.dense_bytes, slot.dq, slot.dq_bytes = {}, 0, {}, 0
        slot.lowrank = {}
        slot.key, slot.refs, slot.pinned, slot.unload_on_release = None, set(), False, False
        slot.sign, slot.tables, slot.info = frozenset(), frozenset(), {}
        slot.generation = next(self._generation)
        self.counters["evictions"] += 1

    def _release_slot_to_free(self, slot: _Slot) -> None:
        slot.state = _FREE

    def _handle(self, slot: _Slot, ref: str | None, lease: bool) -> SlotHandle:
        if ref is not None:
            slot.refs.add(ref)
        slot.last_used = next(self._tick)
        if lease:
            slot.leases += 1
        return SlotHandle(slot.index, slot.generation, slot.key)

    # ---------------------------------------------------------------------------------------
    # forwards
    # ---------------------------------------------------------------------------------------
    def acquire(
        self, ids: Iterable[int | SlotHandle | None], *, leased: Iterable[int] = ()
    ) -> tuple[list[int], dict[int, SlotView]]:
        """Lease the slots a batch uses: returns the row -> slot list (-1 = base) and a frozen view
        of each distinct slot. Slots named in `leased` are already leased by `load(lease=True)`.
        On CUDA the current stream waits for each slot's copies."""
        rows: list[int] = []
        already = set(leased)
        with self._lock:
            for d in ids:
                if d is None or (isinstance(d, int) and not isinstance(d, SlotHandle) and d == -1):
                    rows.append(-1)
                    continue
                if isinstance(d, bool) or not isinstance(d, int):
                    raise TypeError(f"delta id must be a slot (int), -1 or None, got {d!r}")
                if not 0 <= d < self.num_slots:
                    raise NotLoadedError(
                        f"slot {int(d)} does not exist (the pool has {self.num_slots} slots)"
                    )
                slot = self._slots[d]
                if isinstance(d, SlotHandle) and (slot.generation != d.generation or slot.state != _READY):
                    raise StaleSlotError(
                        f"slot {int(d)} no longer holds {d.key!r} (evicted since it was loaded); "
                        "load it again, or pin it to keep it resident"
                    )
                if slot.state != _READY:
                    raise NotLoadedError(f"slot {int(d)} holds no delta")
                rows.append(int(d))
            distinct = sorted({r for r in rows if r >= 0})
            tick = next(self._tick)
            views = {}
            for i in distinct:
                s = self._slots[i]
                if i not in already:
                    s.leases += 1
                s.last_used = tick
                views[i] = s.view()
            for i in already - set(distinct):  # leased by load() but no row uses it
                self._unlease(self._slots[i])
            events = [self._slots[i] for i in distinct]
        if self.device.type == "cuda":
            cur = torch.cuda.current_stream(self.device)
            for s in events:
                if s.ready_event is not None:
                    cur.wait_event(s.ready_event)
                if (s.dense or s.dq) and cur not in s.streams_seen:
                    held = [*s.dense.values(), *(t for w in s.dq.values() for t in w.tensors())]
                    for t in held:  # keep the memory until this stream is done with it
                        t.record_stream(cur)
                    s.streams_seen.add(cur)
        return rows, views

    def release(self, slots: Iterable[int]) -> None:
        """End the leases of one forward (records the stream point evictions must wait for)."""
        slots = list(slots)
        ev = None
        if self.device.type == "cuda" and slots:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
        with self._lock:
            for i in slots:
                s = self._slots[i]
                if ev is not None:
                    s.last_use_event = ev
                self._unlease(s)

    def _unlease(self, s: _Slot) -> None:
        s.leases -= 1
        if s.leases == 0:
            if s.unload_on_release:
                self._evict(s)
                s.state = _FREE
            self._freed.notify_all()

    # ---------------------------------------------------------------------------------------
    # management
    # ---------------------------------------------------------------------------------------
    def _find(self, key_or_ref: str | int) -> _Slot:
        with self._lock:
            if isinstance(key_or_ref, int):
                if 0 <= key_or_ref < self.num_slots and self._slots[key_or_ref].state == _READY:
                    return self._slots[key_or_ref]
            else:
                slot = self._by_key.get(key_or_ref)
                if slot is None:
                    slot = next((s for s in self._slots if s.state == _READY and key_or_ref in s.refs), None)
                if slot is not None:
                    return slot
        raise NotLoadedError(f"{key_or_ref!r} is not resident in the slot pool")

    def find(self, key_or_ref: str | int) -> SlotHandle:
        """The handle of the resident delta with this key (resolved path), ref or slot index;
        NotLoadedError when none is resident."""
        with self._lock:
            slot = self._find(key_or_ref)
            return SlotHandle(slot.index, slot.generation, slot.key)

    def view(self, key_or_ref: str | int) -> SlotView:
        """What a resident delta's slot holds now (frozen): sign and table names, dense and DeltaDQ
        tensors."""
        with self._lock:
            return self._find(key_or_ref).view()

    def pin(self, key_or_ref: str | int, pinned: bool = True) -> None:
        with self._lock:
            self._find(key_or_ref).pinned = pinned
            self._freed.notify_all()

    def unload(self, key_or_ref: str | int, *, keep_pinned: bool = False) -> bool:
        """Free the delta's slot now, or when the forwards using it finish. With `keep_pinned`, a
        pinned delta stays resident. True when the slot is (or will be) freed."""
        with self._lock:
            slot = self._find(key_or_ref)
            if keep_pinned and slot.pinned:
                return False
            if slot.leases:
                if slot.key is not None:
                    self._by_key.pop(slot.key, None)
                slot.unload_on_release = True
                slot.refs = set()
                return True
            self._evict(slot)
            slot.state = _FREE
            self._freed.notify_all()
            return True

    def resident(self) -> list[dict]:
        with self._lock:
            return [
                {
                    "slot": s.index,
                    "key": s.key,
                    "refs": sorted(s.refs),
                    "pinned": s.pinned,
                    "in_use": s.leases > 0,
                    "last_used": s.last_used,
                    "hits": s.hits,
                    "dense_bytes": s.dense_bytes,
                    "dq_bytes": s.dq_bytes,
                    "sign_space": s.index < self.num_sign_slots,
                    **s.info,
                }
                for s in sorted(self._slots, key=lambda s: -s.last_used)
                if s.state == _READY
            ]

    def stats(self) -> dict:
        with self._lock:
            used = sum(s.state != _FREE for s in self._slots)
            return {
                "device": str(self.device),
                "slots": self.num_slots,
                "sign_slots": self.num_sign_slots,
                "slots_used": used,
                "slots_pinned": sum(s.pinned for s in self._slots),
                "planes": self.layout.planes,
                "max_rank": self.layout.max_rank,
                "slot_bytes": self.layout.slot_bytes,
                "table_slot_bytes": self.layout.table_slot_bytes,
                "fixed_bytes": self.fixed_bytes,
                "dense_bytes_used": self._dense_used,
                "dq_bytes_used": self._dq_used,
                "dense_budget": self.dense_budget,
                "budget_bytes": self.budget,
                **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.counters.items()},
                "resident": self.resident(),
            }
