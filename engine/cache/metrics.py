"""The cache pool's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine.metrics import PREFIX

REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.05, 0.1, 0.25)


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.lookups = Counter(
            f"{PREFIX}_cache_lookups",
            "Cache lookups by tier, kind (result, states) and result (hit, miss, corrupt, error: Redis "
            "failed, timed out or was skipped by the open breaker).",
            ["tier", "kind", "result"],
            registry=registry,
        )
        self.writes = Counter(
            f"{PREFIX}_cache_writes",
            "Entries written to a tier, by result (ok, error, dropped).",
            ["tier", "result"],
            registry=registry,
        )
        self.redis_seconds = Histogram(
            f"{PREFIX}_cache_redis_duration_seconds",
            "Time of one Redis call (an MGET of a batch, or a pipeline of writes).",
            ["operation"],
            buckets=REDIS_BUCKETS,
            registry=registry,
        )
        self.breaker_state = Gauge(
            f"{PREFIX}_cache_breaker_state",
            "The Redis circuit breaker: 0 closed, 1 open (Redis skipped), 2 half-open (probing).",
            registry=registry,
        )
        self.l1_bytes = Gauge(
            f"{PREFIX}_cache_l1_bytes", "Bytes held by the in-process tier.", registry=registry
        )
        self.l1_entries = Gauge(
            f"{PREFIX}_cache_l1_entries", "Entries held by the in-process tier.", registry=registry
        )
