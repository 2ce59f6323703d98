"""How the engine runs a decode step: one mixed batch through the delta slots, or rows grouped by
delta through the base weights with each group's delta merged in, whichever its start-up timings
say is cheaper for the rows in flight (docs/serving.md has the figures and what it picks where).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

KINDS = ("auto", "mixed", "grouped")


@dataclass(frozen=True)
class StepCosts:
    """Seconds, measured on this model and device: a base-only decode step costs
    `base_fixed + base_row · rows`; the slot path adds `delta_row` per row on a delta and
    `delta_distinct` per distinct delta; `merge` is one merge plus its exact restore."""

    base_fixed: float
    base_row: float
    delta_row: float
    delta_distinct: float
    merge: float

    def base(self, rows: int) -> float:
        return self.base_fixed + self.base_row * rows if rows else 0.0

    def as_dict(self) -> dict:
        return {k: round(v * 1e3, 3) for k, v in self.__dict__.items()} | {"unit": "ms"}


@dataclass(frozen=True)
class Plan:
    kind: str  # "mixed" or "grouped"
    order: list  # grouped: the deltas (None = base rows) in the order they run
    mixed_cost: float | None = None
    grouped_cost: float | None = None


class StepPlanner:
    """Picks "mixed" or "grouped" per step from `StepCosts` (or always one kind when fixed)."""

    def __init__(self, costs: StepCosts | None = None, *, kind: str = "auto") -> None:
        if kind not in KINDS:
            raise ValueError(f"schedule must be one of {KINDS}, got {kind!r}")
        if kind == "auto" and costs is None:
            kind = "mixed"
        self.costs, self.kind = costs, kind

    @classmethod
    def fixed(cls, kind: str) -> StepPlanner:
        return cls(None, kind=kind)

    def plan(self, deltas: list[str | None], *, merged: str | None = None, forced: str = "auto") -> Plan:
        kind = forced if forced != "auto" else self.kind
        order = self.group_order(deltas, merged)
        if kind != "auto":
            return Plan(kind, order)
        mixed, grouped = self.mixed_cost(deltas, merged), self.grouped_cost(deltas, order, merged)
        return Plan("grouped" if grouped < mixed else "mixed", order, mixed, grouped)

    @staticmethod
    def group_order(deltas: list[str | None], merged: str | None) -> list[str | None]:
        """The merged delta's rows first (no merge needed), then base rows, then the others."""
        distinct = list(dict.fromkeys(deltas))
        head = [merged] if merged is not None and merged in distinct else []
        rest = [d for d in distinct if d is not None and d != merged]
        return head + ([None] if None in distinct else []) + rest

    def mixed_cost(self, deltas: list[str | None], merged: str | None) -> float:
        c = self.costs
        on_delta = sum(d is not None for d in deltas)
        distinct = len({d for d in deltas if d is not None})
        restore = c.merge / 2 if merged is not None else 0.0
        return c.base(len(deltas)) + c.delta_row * on_delta + c.delta_distinct * distinct + restore

    def grouped_cost(self, deltas: list[str | None], order: list[str | None], merged: str | None) -> float:
        c = self.costs
        cost, state = 0.0, merged
        for d in order:
            if d != state:
                cost += (c.merge / 2 if state is not None else 0.0) + (c.merge / 2 if d is not None else 0.0)
                state = d
            cost += c.base(sum(x == d for x in deltas))
        return cost

    # ---------------------------------------------------------------------------------------
    # start-up measurement
    # ---------------------------------------------------------------------------------------
    @classmethod
    def measure(cls, dm, *, rows: int = 8, context: int = 32, reps: int = 2) -> StepPlanner:
        """Time decode steps of this model on synthetic deltas of it (random signs, small scales):
        base-only at `rows` and `rows // 2` rows, all rows on one delta, rows split over two, and
        one merge + restore. Takes a few base steps' time; the deltas are unloaded afterwards."""
        from .kv_cache import KVStore, StepCache, model_kv_shape

        layers, kv_heads, head_dim = model_kv_shape(dm.model.config)
        dtype = next(dm.model.parameters()).dtype
        rows = max(2, rows)
        store = KVStore(
            layers=layers,
            kv_heads=kv_heads,
            head_dim=head_dim,
            rows=rows,
            max_len=context + 1,
            dtype=dtype,
            device=dm.device,
            initial_len=context + 1,
        )
        vocab = dm.model.config.vocab_size
        gen = torch.Generator().manual_seed(0)

        def step(n: int, delta_ids: list) -> float:
            ids = torch.randint(0, vocab, (n, 1), generator=gen)
            cache = StepCache(store, list(range(n)), [context] * n, 1)
            best = float("inf")
            for _ in range(reps):
                if dm.device.type == "cuda":
                    torch.cuda.synchronize(dm.device)
                t0 = time.perf_counter()
                dm.forward(
                    ids,
                    attention_mask=cache.attention_mask(dtype),
                    delta_ids=delta_ids,
                    cache=cache,
                    use_cache=True,
                    position_ids=cache.position_ids(),
                    logits_to_keep=1,
                )
                if dm.device.type == "cuda":
                    torch.cuda.synchronize(dm.device)
                best = min(best, time.perf_counter() - t0)
            return best

        with tempfile.TemporaryDirectory(prefix="deltastore-planner-") as tmp:
            paths = [write_synthetic_delta(dm, Path(tmp) / f"calib{i}.bdelta", seed=i) for i in range(2)]
            handles = [dm.load(p) for p in paths]
            try:
                half = rows // 2
                t_full, t_half = step(rows, [-1] * rows), step(half, [-1] * half)
                one = step(rows, [handles[0]] * rows)
                two = step(rows, [handles[i % 2] for i in range(rows)])
                t0 = time.perf_counter()
                with dm.merged(paths[0]):
                    pass
                merge = time.perf_counter() - t0
            finally:
                for p in paths:
                    dm.unload(p)
        base_row = max(0.0, (t_full - t_half) / (rows - half))
        base_fixed = max(0.0, t_full - base_row * rows)
        delta_distinct = max(0.0, two - one)
        delta_row = max(0.0, (one - t_full - delta_distinct) / rows)
        return cls(StepCosts(base_fixed, base_row, delta_row, delta_distinct, merge))


def write_synthetic_delta(dm, path: Path, *, seed: int) -> Path:
    """A valid one-plane BitDelta file for `dm`'s base: random signs on every patched 2-D weight,
    per-matrix scales of 1e-3 (timing only; its outputs mean nothing)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, inn) in dm.plan.sign.items():
        tensors[f"{name}.sign"] = torch.randint(
            0, 256, (1, out, (inn + 7) // 8), generator=gen, dtype=torch.uint8
        )
        tensors[f"{name}.scale"] = torch.full((1, 1), 1e-3, dtype=torch.float32)
    dtype = str(next(dm.model.parameters()).dtype).removeprefix("torch.")
    meta = {
        "format": "deltastore.delta",
        "format_version": "1",
        "codec": "bitdelta",
        "base_model": "calibration",
        "base_fingerprint": dm.base_fingerprint,
        "dtype": dtype,
    }
    save_file(tensors, str(path), metadata=meta)
    return path
