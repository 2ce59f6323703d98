"""`DeltaModel`: one resident base model, a pool of delta slots beside it, and multi-tenant
forwards whose batch rows each pick a delta (or none). The API serving code imports.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from codec.checkpoint import TORCH_TO_ST, Checkpoint, fingerprint_tensors
from codec.format import DeltaFile

from .errors import DeltaDoesNotFitError, MergedModeError, StaleSlotError
from .merge import MergeRecord, merge_, term_rows, unmerge_
from .modules import PatchPlan, patch_model
from .resolver import DeltaRef, RefResolver, resolve_ref
from .segments import SlotBatch, use_batch
from .sgmv import auto_backend, triton_available, triton_interpreting
from .slot_pool import SlotHandle, SlotPool
from .staging import delta_terms

DeltaId = "int | SlotHandle | str | os.PathLike[str] | None"
BACKENDS = ("auto", "triton", "torch")


def module_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's saved tensors (state dict without tied aliases such as `lm_head.weight`)."""
    seen: set[int] = set()
    items = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        items.append((name, t.detach()))
    return items


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class DeltaModel:
    """A causal LM serving many compressed deltas of its weights at once (every term form of
    `codec.terms`: BitDelta sign planes, low-rank factors, DeltaDQ codes, and their sums).

        dm = DeltaModel.from_pretrained("llama-base/", device="cuda", dtype=torch.float16,
                                        max_slots=64, memory_budget="8GiB")
        math = dm.load("math.bdelta")                    # or a registry ref, with a resolver
        logits = dm(input_ids, delta_ids=[math, -1])     # row 0: base + math delta, row 1: base
        with dm.merged("math.bdelta"):                   # single tenant: delta added into the weights
            logits = dm(input_ids)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        base_fingerprint: str | None,
        base_specs: dict[str, tuple[str, tuple[int, ...]]] | None = None,
        max_slots: int = 64,
        memory_budget: int | str = "8GiB",
        max_planes: int = 1,
        max_rank: int = 0,
        resolver: RefResolver | None = None,
        backend: str = "auto",
        target_modules: Sequence[str] | None = None,
        wait_timeout: float = 30.0,
        sign_slots: int | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        first = next(model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        if backend == "auto":
            backend = auto_backend(self.device)
        elif backend == "triton" and not triton_available(self.device):
            raise RuntimeError(
                f"the Triton kernel cannot run on {self.device}"
                + (
                    " without TRITON_INTERPRET=1"
                    if self.device.type == "cpu" and not triton_interpreting()
                    else ""
                )
            )
        self.backend = backend
        self.model = model.eval()
        self.base_fingerprint = base_fingerprint
        if base_specs is None:
            base_specs = {n: (TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in module_tensors(model)}
        self.base_bytes = sum(
            p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
        )
        self.plan: PatchPlan = patch_model(model, target_modules=target_modules)
        self.pool = SlotPool(
            self.plan.layout(max_planes, max_rank),
            device=self.device,
            max_slots=max_slots,
            memory_budget=memory_budget,
            base_fingerprint=base_fingerprint,
            base_specs=base_specs,
            base_tables=self.plan.base_tables(),
            wait_timeout=wait_timeout,
            sign_slots=sign_slots,
        )
        self.plan.attach(self.pool, backend)
        self._resolver = resolver
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._merge_lock = threading.Lock()
        self._merged: str | None = None
        self._prefetches = 0

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike[str] | nn.Module,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_slots: int = 64,
        memory_budget: int | str = "8GiB",
        max_planes: int = 1,
        max_rank: int = 0,
        resolver: RefResolver | None = None,
        backend: str = "auto",
        base_fingerprint: str | None = None,
        target_modules: Sequence[str] | None = None,
        wait_timeout: float = 30.0,
        sign_slots: int | None = None,
        **hf_kwargs,
    ) -> DeltaModel:
        """Load (or adopt) the base model, patch it in place and allocate the slot pool.

        `base` is a HF model directory or Hub id (its fingerprint is hashed from the checkpoint files,
        so deltas made against it are accepted even if `dtype` casts the resident copy) or an
        in-memory causal LM (fingerprinted from its tensors before any cast). `max_planes` is the
        most bit-planes a delta may have (each plane costs one bit per weight per slot);
        `max_rank` the highest rank of a delta's low-rank factors (`lowrank-mp`, `hybrid`): with
        R > 0 every slot holds R·(in + out) factor values per patched weight in the model's dtype.
        `target_modules` (fnmatch patterns over module names) limits which linears are patched;
        `wait_timeout` is how long a load waits for a slot that forwards are still using.
        `sign_slots` (default: every slot) is how many of the `max_slots` slots reserve sign space;
        the others are table-only and hold DeltaDQ deltas, whose payload comes from the budget left
        beside the fixed slots.
        """
        device = torch.device(device) if device is not None else _default_device()
        if isinstance(base, nn.Module):
            model = base
            items = module_tensors(model)
            specs = {n: (TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in items}
            fingerprint = base_fingerprint or fingerprint_tensors(items)
            if dtype is not None:
                model = model.to(dtype)
        else:
            from transformers import AutoModelForCausalLM

            ckpt = Checkpoint.open(base)
            specs = {n: (ckpt.entry(n).dtype, tuple(ckpt.entry(n).shape)) for n in ckpt.names}
            fingerprint = base_fingerprint or ckpt.fingerprint()
            # ckpt.root: a Hub id (org/name[@rev]) resolved to its snapshot in the Hub cache
            model = AutoModelForCausalLM.from_pretrained(str(ckpt.root), dtype=dtype or "auto", **hf_kwargs)
        model = model.to(device)
        return cls(
            model,
            base_fingerprint=fingerprint,
            base_specs=specs,
            max_slots=max_slots,
            memory_budget=memory_budget,
            max_planes=max_planes,
            max_rank=max_rank,
            resolver=resolver,
            backend=backend,
            target_modules=target_modules,
            wait_timeout=wait_timeout,
            sign_slots=sign_slots,
        )

    # ---------------------------------------------------------------------------------------
    # slots
    # ---------------------------------------------------------------------------------------
    def load(self, ref: DeltaRef) -> SlotHandle:
        """Make a delta resident (disk -> host staging -> slot) and return its slot handle;
        a delta already resident is not read again. Raises BaseMismatchError for a delta of
        another base, DeltaDoesNotFitError / IncompatibleDeltaError for one that cannot be served,
        SlotPoolFullError when every slot is pinned or in use."""
        path = resolve_ref(ref, self._resolver)
        return self.pool.load(path, ref=os.fspath(ref))

    def prefetch(self, ref: DeltaRef) -> Future[SlotHandle]:
        """Load in the background (a worker thread; on CUDA the copies run on the pool's side
        stream). The future's result is the slot handle, or the load's error."""
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltastore-prefetch")
            self._prefetches += 1
            return self._executor.submit(self.load, ref)

    def pin(self, ref: DeltaRef | int) -> SlotHandle:
        """Keep a delta resident (never evicted) until `unpin`/`unload`; loads it if needed."""
        handle = self._resident_handle(ref)
        self.pool.pin(int(handle), True)
        return handle

    def unpin(self, ref: DeltaRef | int) -> None:
        self.pool.pin(self._slot_of(ref), False)

    def unload(self, ref: DeltaRef | int, *, keep_pinned: bool = False) -> bool:
        """Free a delta's slot (after the forwards using it, if any, finish); with `keep_pinned`
        a pinned delta stays. True when the slot is (or will be) freed."""
        return self.pool.unload(self._slot_of(ref), keep_pinned=keep_pinned)

    def _slot_of(self, ref: DeltaRef | int) -> int:
        if isinstance(ref, int):
            return int(ref)
        with contextlib.suppress(LookupError):
            return int(self.pool.find(os.fspath(ref)))
        return int(self.pool.find(str(resolve_ref(ref, self._resolver).resolve())))

    def _resident_handle(self, ref: DeltaRef | int) -> SlotHandle:
        if isinstance(ref, int):
            return self.pool.find(int(ref))
        return self.load(ref)

    def stats(self) -> dict:
        """Pool occupancy, counters and the resident deltas (most recently used first)."""
        out = self.pool.stats()
        out.update(
            backend=self.backend,
            base_fingerprint=self.base_fingerprint,
            base_bytes=self.base_bytes,
            merged=self._merged,
            prefetches=self._prefetches,
        )
        return out

    def close(self) -> None:
        """Stop the prefetch worker (waits for the loads it has started)."""
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    # ---------------------------------------------------------------------------------------
    # forwards
    # ---------------------------------------------------------------------------------------
    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        delta_ids: Sequence[DeltaId] | torch.Tensor | None = None,
        **model_kwargs,
    ) -> torch.Tensor:
        """Logits `[batch, seq, vocab]`; row i uses `delta_ids[i]` (a slot handle or index, a ref
        or path that is loaded on demand, or -1 / None for the base model alone)."""
        return self.forward(
            input_ids, attention_mask=attention_mask, delta_ids=delta_ids, **model_kwargs
        ).logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        delta_ids: Sequence[DeltaId] | torch.Tensor | None = None,
        **model_kwargs,
    ):
        """Like `__call__`, returning the model's whole output (logits, past_key_values, ...)."""
        ids = self._delta_list(delta_ids, input_ids.shape[0])
        row_slots, views = self._acquire(ids)
        try:
            batch = SlotBatch(tuple(row_slots), self.device, views) if views else None
            with use_batch(batch), torch.inference_mode():
                if attention_mask is not None:
                    model_kwargs["attention_mask"] = attention_mask.to(self.device)
                return self.model(input_ids=input_ids.to(self.device), **model_kwargs)
        finally:
            self.pool.release(views)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        delta_ids: Sequence[DeltaId] | torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """`model.generate` (greedy or sampling, one sequence per row) with row i using
        `delta_ids[i]` at every step. Beam search and several sequences per row change the
        rows between steps and are refused."""
        for key in ("num_beams", "num_return_sequences"):
            if generate_kwargs.get(key, 1) != 1:
                raise ValueError(f"{key} > 1 regroups rows between steps; not supported with per-row deltas")
        rows = input_ids.shape[0]
        ids = self._delta_list(delta_ids, rows)
        row_slots, views = self._acquire(ids)
        try:
            batch = SlotBatch(tuple(row_slots), self.device, views) if views else None
            with use_batch(batch), torch.inference_mode():
                if attention_mask is not None:
                    generate_kwargs["attention_mask"] = attention_mask.to(self.device)
                return self.model.generate(input_ids=input_ids.to(self.device), **generate_kwargs)
        finally:
            self.pool.release(views)

    @staticmethod
    def _delta_list(delta_ids, rows: int) -> list:
        ids = (
            [-1] * rows
            if delta_ids is None
            else (delta_ids.tolist() if isinstance(delta_ids, torch.Tensor) else list(delta_ids))
        )
        if len(ids) != rows:
            raise ValueError(f"delta_ids has {len(ids)} entries for a batch of {rows} rows")
        return ids

    def _acquire(self, ids: list) -> tuple[list[int], dict]:
        uses_delta = any(
            d is not None and not (isinstance(d, int) and not isinstance(d, SlotHandle) and d == -1)
            for d in ids
        )
        if uses_delta and self._merged is not None:
            raise MergedModeError(
                f"{self._merged!r} is merged into the base weights: forwards inside `merged()` take "
                "no slot deltas (delta_ids must be -1 or None)"
            )
        for attempt in range(3):
            loaded = {}
            entries = []
            for d in ids:
                if isinstance(d, (str, os.PathLike)):
                    key = os.fspath(d)
                    if key not in loaded:
                        loaded[key] = self.load(d)
                    entries.append(loaded[key])
                else:
                    entries.append(d)
            try:
                return self.pool.acquire(entries)
            except StaleSlotError:
                # A delta loaded on demand above was evicted by a concurrent load before we
                # leased it: load again. Handles the caller passed are not retried.
                if not loaded or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------------------------------
    # merge mode
    # ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def merged(self, ref: DeltaRef) -> Iterator[DeltaModel]:
        """Single-tenant mode: add the delta into the base weights in place (`W ← (W.float() +
        Δ̂).to(dtype)`, dense tensors swapped in) and restore the base bit for bit on exit.
        Forwards inside take no slot deltas; slots may still be loaded."""
        with self._merge_lock:
            if self._merged is not None:
                raise MergedModeError(f"{self._merged!r} is already merged; merges do not nest")
            self._merged = os.fspath(ref)
        try:
            path = resolve_ref(ref, self._resolver)
            delta = DeltaFile.open(path)
            delta.check_base(self.pool.base_specs, self.base_fingerprint)
            params = self._merge_targets(delta)
            undo: list[tuple[nn.Parameter, MergeRecord | torch.Tensor]] = []
            try:
                with torch.no_grad():
                    split = delta_terms(delta)
                    for name, terms in split.terms.items():
                        p = params[name]
                        rows = term_rows(delta, terms, tuple(p.shape), p.device)
                        undo.append((p, merge_(p.data, rows)))
                    for name in split.full:
                        p = params[name]
                        undo.append((p, p.data.clone()))
                        p.data.copy_(delta.full(name))
                yield self
            finally:
                with torch.no_grad():
                    for p, rec in reversed(undo):
                        if isinstance(rec, MergeRecord):
                            unmerge_(p.data, rec)
                        else:
                            p.data.copy_(rec)
        finally:
            self._merged = None

    def _merge_targets(self, delta: DeltaFile) -> dict[str, nn.Parameter]:
        params = dict(self.plan.params)
        for name, p in self.model.named_parameters():
            params.setdefault(name, p)
        missing = [n for n in delta.entries if n not in params]
        if missing:
            raise DeltaDoesNotFitError(f"{missing[0]}: not a parameter of the resident model (a buffer?)")
        for name, e in delta.entries.items():
            if e.kind == "full" and tuple(e.full.shape) != tuple(params[name].shape):
                raise DeltaDoesNotFitError(
                    f"{name}.full has shape {list(e.full.shape)} but the resident base has "
                    f"{list(params[name].shape)}; a resized tensor cannot be merged in place"
                )
        return params
