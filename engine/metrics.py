"""The engine's Prometheus metrics, registered on a registry the composition root owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "sparsebert"
# Latencies on this server run from ~1 ms (a short text alone) to seconds (a full queue).
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Finer near the 85% alert threshold (deploy/prometheus/rules/sparsebert.yml).
SPARSITY_BUCKETS = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)
KEPT_MASS_BUCKETS = (0.5, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0)
ERROR_BUCKETS = (-1.0, -0.5, -0.25, -0.1, -0.05, 0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def histogram(
            name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
        ) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, labels, buckets=buckets, registry=registry)

        self.tokenize_seconds = histogram(
            "tokenize_duration_seconds", "Time to tokenize one request's inputs.", LATENCY_BUCKETS
        )
        self.queue_seconds = histogram(
            "queue_duration_seconds",
            "Time an input waited in the queue before its batch ran.",
            LATENCY_BUCKETS,
        )
        self.inference_seconds = histogram(
            "inference_duration_seconds", "Encoder time of one batch.", LATENCY_BUCKETS
        )
        self.batch_size = histogram("batch_size", "Inputs per batch.", BATCH_SIZE_BUCKETS)
        self.batch_tokens = histogram(
            "batch_tokens", "Padded tokens per batch (size x longest input).", TOKEN_BUCKETS
        )
        self.padding_ratio = histogram(
            "batch_padding_ratio", "Share of a batch's padded tokens that are padding.", RATIO_BUCKETS
        )
        self.input_tokens = histogram("input_tokens", "Tokens per input after truncation.", TOKEN_BUCKETS)
        self.prediction_error = histogram(
            "latency_prediction_error_ratio",
            "(predicted - measured) / measured batch time of the latency model.",
            ERROR_BUCKETS,
        )
        self.attention_sparsity = histogram(
            "attention_sparsity_ratio",
            "1 - attended pairs / n^2 of each encoded input's attention, by model (bundle) and the "
            "encoder branch that read it (dense: short batches of a sparse model, or a dense model).",
            SPARSITY_BUCKETS,
            ("model", "branch"),
        )
        self.attention_kept_mass = histogram(
            "attention_kept_mass_ratio",
            "Share of dense attention's probability mass on the keys the sparse pattern keeps, per "
            "input of the sampled (verified) batches read by the sparse branch, by model (bundle).",
            KEPT_MASS_BUCKETS,
            ("model",),
        )
        self.stream_first_event = histogram(
            "stream_first_event_seconds",
            "From a streamed request's arrival to its first event (any transport).",
            LATENCY_BUCKETS,
            ("task",),
        )
        self.stream_event_gap = histogram(
            "stream_event_gap_seconds",
            "Time between consecutive events of a stream.",
            LATENCY_BUCKETS,
            ("task",),
        )
        self.document_windows = histogram(
            "document_windows",
            "Encoder windows a document was read in.",
            (*BATCH_SIZE_BUCKETS, 256, 512, 1024),
        )
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Inputs waiting in the queue.", registry=registry)
        self.queue_tokens = Gauge(f"{PREFIX}_queue_tokens", "Tokens waiting in the queue.", registry=registry)
        self.busy_runtimes = Gauge(
            f"{PREFIX}_runtimes_busy", "Runtimes running a batch now.", registry=registry
        )
        self.coalesced = Counter(
            f"{PREFIX}_coalesced_inputs",
            "Inputs that joined an identical input's encoding in flight instead of running again.",
            registry=registry,
        )
        self.runtime_cpu = Counter(
            f"{PREFIX}_runtime_cpu_seconds",
            "CPU time the runtime threads spent computing batches (padding, encoder, pooling, heads); "
            "a runtime's own thread, not the intra-op threads ONNX Runtime adds beside it.",
            registry=registry,
        )
        self.rejections = Counter(
            f"{PREFIX}_rejections",
            "Inputs refused or dropped, by reason.",
            ["reason"],
            registry=registry,
        )
