"""Prometheus metrics of the inference server, in one registry per app (served at /metrics):
request, token and latency counters fed by the app and engine, pool and queue gauges read at scrape.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
COUNT_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "deltastore_requests",
            "Finished requests by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "deltastore_prompt_tokens", "Prompt tokens of admitted requests.", registry=r
        )
        self.generated_tokens = Counter("deltastore_generated_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(
            "deltastore_time_to_first_token_seconds",
            "Arrival to first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "deltastore_time_per_output_token_seconds",
            "Mean time between generated tokens, per request.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "deltastore_decode_step_seconds",
            "One decode step of the running batch.",
            ["plan"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_rows = Histogram(
            "deltastore_decode_step_rows",
            "Sequences decoded in one step.",
            buckets=COUNT_BUCKETS,
            registry=r,
        )
        self.step_deltas = Histogram(
            "deltastore_decode_step_deltas",
            "Distinct deltas among the rows of one decode step (the base's rows not counted).",
            buckets=COUNT_BUCKETS,
            registry=r,
        )
        self.delta_load = Histogram(
            "deltastore_delta_load_seconds",
            "Loading a delta into a slot (prefetch).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    # the engine's hooks
    def observe_step(self, seconds: float, rows: int, deltas: int, plan: str) -> None:
        self.step_seconds.labels(plan=plan).observe(seconds)
        self.step_rows.observe(rows)
        self.step_deltas.observe(deltas)

    def observe_load(self, seconds: float) -> None:
        self.delta_load.observe(seconds)

    def watch(self, engine) -> None:
        """Queue depth, batch size and slot counters, read from the engine at each scrape."""
        self.registry.register(_EngineCollector(engine))


class _EngineCollector:
    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        pool = self.engine.dm.stats()
        yield GaugeMetricFamily(
            "deltastore_queue_depth", "Requests waiting to join the batch.", value=s["waiting"]
        )
        yield GaugeMetricFamily(
            "deltastore_running_batch_size", "Sequences in the running batch.", value=s["running"]
        )
        yield GaugeMetricFamily(
            "deltastore_slot_leases", "Running sequences holding a delta slot.", value=s["leases"]
        )
        yield GaugeMetricFamily(
            "deltastore_slots_used", "Delta slots holding a delta.", value=pool["slots_used"]
        )
        yield CounterMetricFamily(
            "deltastore_slot_hits", "Loads of a delta already resident.", value=pool["hits"]
        )
        yield CounterMetricFamily(
            "deltastore_slot_misses", "Loads that read a delta into a slot.", value=pool["loads"]
        )
        yield CounterMetricFamily(
            "deltastore_slot_evictions", "Deltas evicted from a slot.", value=pool["evictions"]
        )
