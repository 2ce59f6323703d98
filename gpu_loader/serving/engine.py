"""The serving engine: continuous (iteration-level) batching of many tenants' sequences over one
`DeltaModel`. It owns the wait queue, the running batch, per-sequence KV rows and slot leases.

Token ids in, token ids out: the engine knows nothing of HTTP, text or the registry. Each call of
`step()` lets finished sequences leave, admits waiting ones (FCFS, a per-tenant cap in the running
batch), runs one decode token for every decoding sequence and a bounded chunk of prefill for the
joiners, and hands each new token to its request's sink.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import StaleSlotError
from ..model import DeltaModel
from ..slot_pool import SlotHandle
from .kv_cache import KVStore, StepCache, model_kv_shape
from .planner import StepPlanner


class EngineError(Exception):
    """Root of the errors the engine raises to its callers."""


class QueueFullError(EngineError):
    """The wait queue holds `max_queue` requests; `retry_after` is a hint in seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineStoppedError(EngineError):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class EngineRequest:
    """One generation: `delta` is a local `.bdelta` path (None for the base), `tenant` the name the
    client used (fairness and metrics count per tenant)."""

    request_id: str
    tenant: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    delta: str | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class TokenEvent:
    token_id: int


@dataclass(frozen=True)
class FinishEvent:
    """`reason`: "stop" (a stop token), "length" (max_tokens), "cancelled", "timeout", "error"."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    error: BaseException | None = None


Sink = Callable[[object], None]

WAITING, PREFILL, DECODE, DONE = "waiting", "prefill", "decode", "done"


@dataclass(eq=False)
class _Seq:
    req: EngineRequest
    sink: Sink
    arrived: float
    deadline: float | None
    state: str = WAITING
    row: int = -1
    pos: int = 0  # tokens already in the KV row
    output: list[int] = field(default_factory=list)
    slot: SlotHandle | None = None  # leased for the whole life of the sequence
    generator: torch.Generator | None = None

    @property
    def delta_id(self):
        return -1 if self.slot is None else self.slot


@dataclass
class EngineConfig:
    max_batch_size: int = 8
    max_batch_tokens: int = 256  # decode tokens + prefill tokens one step may run
    max_queue: int = 64
    max_running_per_tenant: int | None = None  # default: half the batch (at least 1)
    request_timeout: float | None = 600.0
    schedule: str = "auto"  # "auto" (planner), "mixed" (always slots), "grouped" (always merged weights)
    min_prefill_chunk: int = 16


class Engine:
    """Continuous batching over one `DeltaModel`.

    engine = Engine(dm, EngineConfig(max_batch_size=8)); engine.start()
    engine.submit(EngineRequest("r1", "acme/math", (1, 2, 3), SamplingParams(16), delta=path), sink)
    """

    def __init__(
        self,
        dm: DeltaModel,
        config: EngineConfig | None = None,
        *,
        planner: StepPlanner | None = None,
        metrics=None,
    ) -> None:
        self.dm = dm
        self.config = config or EngineConfig()
        cfg = dm.model.config
        layers, kv_heads, head_dim = model_kv_shape(cfg)
        self.max_len = int(getattr(cfg, "max_position_embeddings", 2048))
        dtype = next(dm.model.parameters()).dtype
        self.dtype = dtype
        self.kv = KVStore(
            layers=layers,
            kv_heads=kv_heads,
            head_dim=head_dim,
            rows=self.config.max_batch_size,
            max_len=self.max_len,
            dtype=dtype,
            device=dm.device,
        )
        self.planner = planner or StepPlanner.fixed("mixed")
        self.metrics = metrics
        cap = self.config.max_running_per_tenant
        self.tenant_cap = cap if cap is not None else max(1, self.config.max_batch_size // 2)
        self._lock = threading.Condition()
        self._incoming: deque[_Seq] = deque()
        self._cancels: set[str] = set()
        self._waiting: list[_Seq] = []
        self._running: list[_Seq] = []
        self._by_id: dict[str, _Seq] = {}
        self._loads: dict[str, Future] = {}  # delta path -> prefetch future (SlotHandle)
        self._free_rows = list(range(self.config.max_batch_size))
        self._merged = contextlib.ExitStack()
        self._merged_delta: str | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        # decode steps and their totals: rows, distinct deltas among the rows, seconds
        self.decode = {"steps": 0, "rows": 0, "deltas": 0, "seconds": 0.0}
        self.joined_mid_batch = 0  # admissions while other sequences were decoding
        self.finished: dict[str, int] = {}  # finish reason -> requests
        self.last_plan = ""
        self._ids = itertools.count()

    # ---------------------------------------------------------------------------------------
    # the caller's side (any thread)
    # ---------------------------------------------------------------------------------------
    def submit(self, req: EngineRequest, sink: Sink) -> None:
        """Queue a request; `sink` receives TokenEvent per new token, then one FinishEvent (on the
        engine's thread). Raises QueueFullError when `max_queue` requests already wait."""
        now = time.monotonic()
        timeout = req.timeout if req.timeout is not None else self.config.request_timeout
        seq = _Seq(req, sink, now, now + timeout if timeout else None)
        if req.params.seed is not None:
            seq.generator = torch.Generator(device="cpu").manual_seed(req.params.seed)
        with self._lock:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            waiting = len(self._waiting) + len(self._incoming)
            if waiting >= self.config.max_queue:
                raise QueueFullError(
                    f"the wait queue is full ({waiting} of {self.config.max_queue} requests waiting); "
                    "retry later",
                    retry_after=self._retry_after(),
                )
            self._incoming.append(seq)
            self._lock.notify_all()

    def cancel(self, request_id: str) -> None:
        """Stop a request now (client gone): its KV row and slot lease are freed before the next step."""
        with self._lock:
            self._cancels.add(request_id)
            self._lock.notify_all()

    def stats(self) -> dict:
        with self._lock:
            return {
                "waiting": len(self._waiting) + len(self._incoming),
                "running": len(self._running),
                "prefilling": sum(s.state == PREFILL for s in self._running),
                "leases": sum(s.slot is not None for s in self._running),
                "loading": sum(not f.done() for f in self._loads.values()),
                "free_kv_rows": len(self._free_rows),
                "kv_bytes": self.kv.bytes,
                "steps": self.steps,
                "decode": dict(self.decode),
                "joined_mid_batch": self.joined_mid_batch,
                "finished": dict(self.finished),
                "last_plan": self.last_plan,
                "merged_delta": self._merged_delta,
                "tenant_cap": self.tenant_cap,
            }

    def _retry_after(self) -> float:
        return 1.0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="deltastore-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish every request as cancelled and stop the engine thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._drain_all("cancelled")
        self._unmerge()

    # ---------------------------------------------------------------------------------------
    # the engine thread
    # ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._has_work():
                    self._lock.wait(timeout=0.5 if self._waiting else None)
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # a failed forward fails the batch, not the server
                self._drain_running("error", exc)

    def _has_work(self) -> bool:
        return bool(self._incoming or self._cancels or self._running or self._waiting)

    def step(self) -> None:
        """One iteration: intake, expiry, admission, one decode token per decoding sequence and
        prefill chunks within the token budget."""
        self._intake()
        self._expire()
        self._admit()
        decode = [s for s in self._running if s.state == DECODE]
        prefill = [s for s in self._running if s.state == PREFILL]
        if not decode and not prefill:
            if self._waiting:
                time.sleep(0.002)  # waiting on delta loads only
            return
        self.steps += 1
        self._place_rows(decode)
        plan = self.planner.plan(
            [s.req.delta for s in decode], merged=self._merged_delta, forced=self.config.schedule
        )
        self.last_plan = plan.kind
        if decode:
            t0 = time.perf_counter()
            if plan.kind == "grouped":
                logits = self._decode_grouped(decode, plan.order)
            else:
                self._unmerge()
                logits = self._decode_mixed(decode)
            seconds, deltas = time.perf_counter() - t0, len({s.req.delta for s in decode} - {None})
            self.decode["steps"] += 1
            self.decode["rows"] += len(decode)
            self.decode["deltas"] += deltas
            self.decode["seconds"] += seconds
            if self.metrics is not None:
                self.metrics.observe_step(seconds, len(decode), deltas, plan.kind)
            for i, seq in enumerate(decode):
                seq.pos += 1
                self._emit(seq, self._sample(seq, logits[i]))
        budget = max(self.config.max_batch_tokens - len(decode), self.config.min_prefill_chunk)
        for seq in prefill:
            if budget <= 0:
                break
            chunk = min(budget, len(seq.req.prompt_ids) - seq.pos)
            budget -= chunk
            last = self._prefill_chunk(seq, chunk)
            if seq.pos == len(seq.req.prompt_ids):
                seq.state = DECODE
                self._emit(seq, self._sample(seq, last))
        self._reap()

    # --- intake, cancellation, timeouts -------------------------------------------------------
    def _intake(self) -> None:
        with self._lock:
            while self._incoming:
                seq = self._incoming.popleft()
                self._waiting.append(seq)
                self._by_id[seq.req.request_id] = seq
            cancels, self._cancels = self._cancels, set()
        for rid in cancels:
            seq = self._by_id.get(rid)
            if seq is not None and seq.state != DONE:
                self._finish(seq, "cancelled")
        self._reap()

    def _expire(self) -> None:
        now = time.monotonic()
        for seq in [*self._waiting, *self._running]:
            if seq.deadline is not None and now > seq.deadline and seq.state != DONE:
                self._finish(seq, "timeout")
        self._reap()

    # --- admission ---------------------------------------------------------------------------
    def _admit(self) -> None:
        """FCFS over the wait queue, skipping (not blocking on) requests whose tenant is at its cap
        or whose delta is still loading; delta loads are started for waiting requests as long as
        the slots they would take are not all held by running sequences."""
        per_tenant: dict[str, int] = {}
        for s in self._running:
            per_tenant[s.req.tenant] = per_tenant.get(s.req.tenant, 0) + 1
        in_use = {s.req.delta for s in self._running if s.req.delta}
        for seq in list(self._waiting):
            delta = seq.req.delta
            if delta is not None:
                fut = self._loads.get(delta)
                if fut is None:
                    if len(in_use | {delta}) > self.dm.pool.num_slots:
                        continue  # its slot would have to come from a running sequence
                    fut = self._loads[delta] = self._prefetch(delta)
                in_use.add(delta)
                if not fut.done():
                    continue
                if fut.exception() is not None:
                    self._loads.pop(delta, None)
                    self._finish(seq, "error", fut.exception())
                    continue
            if len(self._running) >= self.config.max_batch_size or not self._free_rows:
                continue
            if per_tenant.get(seq.req.tenant, 0) >= self.tenant_cap:
                continue
            if delta is not None and not self._lease(seq):
                continue
            self._waiting.remove(seq)
            if any(s.state == DECODE for s in self._running):
                self.joined_mid_batch += 1
            seq.row = self._free_rows.pop()
            seq.state = PREFILL
            self._running.append(seq)
            per_tenant[seq.req.tenant] = per_tenant.get(seq.req.tenant, 0) + 1
        self._reap()

    def _prefetch(self, delta: str) -> Future:
        """A future of the delta's slot handle: already resolved when it is resident (a hit costs
        no round trip through the loader thread), else a background load."""
        key = str(Path(delta).resolve())
        if any(r["key"] == key for r in self.dm.pool.resident()):
            fut: Future = Future()
            try:  # a hit; only if it was evicted since the check above does this read the file
                fut.set_result(self.dm.load(delta))
            except Exception as exc:
                fut.set_exception(exc)
            return fut
        t0 = time.perf_counter()
        fut = self.dm.prefetch(delta)
        if self.metrics is not None:
            fut.add_done_callback(
                lambda f: f.exception() is None and self.metrics.observe_load(time.perf_counter() - t0)
            )
        return fut

    def _lease(self, seq: _Seq) -> bool:
        """Hold the sequence's slot for its whole life (never evicted while it runs). A delta
        evicted since its load finished is loaded again."""
        handle = self._loads[seq.req.delta].result()
        try:
            self.dm.pool.acquire([handle])
        except StaleSlotError:
            self._loads[seq.req.delta] = self._prefetch(seq.req.delta)
            return False
        seq.slot = handle
        return True

    # --- forwards ------------------------------------------------------------------------------
    def _place_rows(self, decode: list[_Seq]) -> None:
        """Decoding sequences take KV rows 0..n-1 in order, so a decode step reads a view of the
        buffers; a row that is out of place swaps with whoever holds its target row."""
        holder = {s.row: s for s in self._running}
        for i, seq in enumerate(decode):
            if seq.row == i:
                continue
            other = holder.pop(i, None)
            old = seq.row
            del holder[old]
            self.kv.swap(old, i)
            if other is not None:
                other.row, holder[old] = old, other
            else:
                self._free_rows.remove(i)
                self._free_rows.append(old)
            seq.row, holder[i] = i, seq

    def _run(
        self, ids: torch.Tensor, seqs: list[_Seq], starts: list[int], delta_ids: list, keep: int
    ) -> torch.Tensor:
        cache = StepCache(self.kv, [s.row for s in seqs], starts, ids.shape[1])
        out = self.dm.forward(
            ids,
            attention_mask=cache.attention_mask(self.dtype),
            delta_ids=delta_ids,
            cache=cache,
            use_cache=True,
            position_ids=cache.position_ids(),
            logits_to_keep=keep,
        )
        return out.logits[:, -1].float()

    def _decode_mixed(self, decode: list[_Seq]) -> torch.Tensor:
        ids = torch.tensor([[s.output[-1]] for s in decode])
        return self._run(ids, decode, [s.pos for s in decode], [s.delta_id for s in decode], 1)

    def _decode_grouped(self, decode: list[_Seq], order: list[str | None]) -> torch.Tensor:
        """Rows grouped by delta, each group through the base weights with its delta merged in
        (base rows through the plain base); the last merged delta stays merged for the next step."""
        logits: list[torch.Tensor | None] = [None] * len(decode)
        for delta in order:
            idx = [i for i, s in enumerate(decode) if s.req.delta == delta]
            if delta is None:
                self._unmerge()
            elif self._merged_delta != delta:
                self._unmerge()
                self._merged.enter_context(self.dm.merged(delta))
                self._merged_delta = delta
            group = [decode[i] for i in idx]
            ids = torch.tensor([[s.output[-1]] for s in group])
            out = self._run(ids, group, [s.pos for s in group], [-1] * len(group), 1)
            for j, i in enumerate(idx):
                logits[i] = out[j]
        return torch.stack(logits)  # type: ignore[arg-type]

    def _prefill_chunk(self, seq: _Seq, chunk: int) -> torch.Tensor:
        ids = torch.tensor([list(seq.req.prompt_ids[seq.pos : seq.pos + chunk])])
        merged_here = seq.req.delta is not None and seq.req.delta == self._merged_delta
        if not merged_here:
            self._unmerge()
        out = self._run(ids, [seq], [seq.pos], [-1 if merged_here else seq.delta_id], 1)
        seq.pos += chunk
        return out[0]

    def _unmerge(self) -> None:
        if self._merged_delta is not None:
            self._merged.close()
            self._merged = contextlib.ExitStack()
            self._merged_delta = None

    # --- tokens out ------------------------------------------------------------------------------
    def _sample(self, seq: _Seq, logits: torch.Tensor) -> int:
        p = seq.req.params
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        # On the host: the request's seeded generator is a CPU one (same draws on any device).
        probs = torch.softmax(logits.cpu() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < p.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _emit(self, seq: _Seq, token: int) -> None:
        seq.output.append(token)
        self._send(seq, TokenEvent(token))
        if token in seq.req.params.stop_token_ids:
            self._finish(seq, "stop")
        elif len(seq.output) >= seq.req.params.max_tokens or seq.pos + 1 >= self.max_len:
            self._finish(seq, "length")

    def _send(self, seq: _Seq, event) -> None:
        try:
            seq.sink(event)
        except Exception:  # a broken sink (client gone) must not stop the batch
            if not isinstance(event, FinishEvent):
                self._finish(seq, "cancelled")

    # --- leaving ---------------------------------------------------------------------------------
    def _finish(self, seq: _Seq, reason: str, error: BaseException | None = None) -> None:
        if seq.state == DONE:
            return
        seq.state = DONE
        self.finished[reason] = self.finished.get(reason, 0) + 1
        if seq.slot is not None:
            self.dm.pool.release([int(seq.slot)])
            seq.slot = None
        self._send(seq, FinishEvent(reason, len(seq.req.prompt_ids), len(seq.output), error))

    def _reap(self) -> None:
        """Drop finished sequences: free their KV rows and forget them."""
        for seq in [s for s in self._running if s.state == DONE]:
            self._running.remove(seq)
            self._free_rows.append(seq.row)
            seq.row = -1
        self._waiting = [s for s in self._waiting if s.state != DONE]
        with self._lock:
            for rid in [r for r, s in self._by_id.items() if s.state == DONE]:
                del self._by_id[rid]
        live = {s.req.delta for s in (*self._running, *self._waiting)}
        for delta in [d for d, f in self._loads.items() if d not in live and f.done()]:
            del self._loads[delta]

    def _drain_running(self, reason: str, error: BaseException | None = None) -> None:
        for seq in list(self._running):
            self._finish(seq, reason, error)
        self._unmerge()
        self._reap()

    def _drain_all(self, reason: str) -> None:
        self._intake()
        for seq in [*self._waiting, *self._running]:
            self._finish(seq, reason)
        self._reap()
