"""HTTP-level metrics and build info, on the app's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, Histogram, Info

from engine.metrics import LATENCY_BUCKETS, PREFIX


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "End-to-end HTTP request time, by route template, task and status code.",
            ["route", "task", "status"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight", "HTTP requests being served now.", registry=registry
        )
        self.build = Info(f"{PREFIX}_build", "Server version and the bundle it serves.", registry=registry)
