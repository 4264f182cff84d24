"""The composition root: builds the engine, metrics and routes for one app, in its lifespan."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    disable_created_metrics,
    generate_latest,
)
from starlette.responses import Response

from engine.attention import attention_boundaries
from engine.batcher import GPU_MAX_BATCH_TOKENS, GPU_WARM_UP, AttentionVerification, Batcher, WarmUpPlan
from engine.bundle import AttentionSpec, Bundle, EncoderSpec, Manifest, load_bundle
from engine.cache.breaker import CircuitBreaker
from engine.cache.keys import CacheKeys
from engine.cache.local import LocalTier
from engine.cache.metrics import CacheMetrics
from engine.cache.pool import CachePool, CacheTtl
from engine.cache.redis_tier import RedisTier
from engine.gpu_metrics import GpuMemoryCollector, nvml_stats, torch_allocator_stats
from engine.metrics import EngineMetrics
from engine.queue import BatchLimits
from engine.runtime.affinity import runtime_cpus, single_threaded_blas
from engine.runtime.base import EncoderRuntime
from engine.runtime.onnx import OnnxEncoderRuntime
from engine.runtime.selection import (
    GPU_RUNTIMES,
    Runtime,
    choose_runtime,
    encoder_for,
    probe_machine,
    providers_for,
)
from engine.service import Service, ServiceLimits
from engine.tokenization import TextTokenizer
from server.access import AccessMiddleware, KeyRing, RateLimits
from server.errors import install_error_handlers
from server.metrics import HttpMetrics
from server.middleware import BodyLimitMiddleware, CancelOnDisconnectMiddleware, RequestMetricsMiddleware
from server.routes import TIMING_HEADERS, admin_router, router
from server.rpc.server import GrpcServer
from server.settings import Settings

log = logging.getLogger("sparsebert")
DOCS_ASSETS = "/docs-assets"
TORCH_DEVICE = "cuda"  # where torch-cuda serves (its wiring is tested on "cpu")


def server_version() -> str:
    try:
        return version("sparsebert-serve")
    except PackageNotFoundError:
        return "0+unknown"


def build_cache(settings: Settings, bundle: Bundle, metrics: CacheMetrics) -> CachePool | None:
    if not settings.cache or (settings.cache_l1_bytes == 0 and settings.cache_redis_url is None):
        return None
    shared = None
    if settings.cache_redis_url is not None:
        shared = RedisTier(
            settings.cache_redis_url,
            metrics,
            timeout_s=settings.cache_redis_timeout_ms / 1000.0,
            breaker=CircuitBreaker(reset_after_s=settings.cache_redis_retry_s),
        )
    return CachePool(
        CacheKeys(settings.cache_namespace, bundle.manifest.version),
        metrics,
        local=LocalTier(settings.cache_l1_bytes) if settings.cache_l1_bytes else None,
        shared=shared,
        ttl=CacheTtl(settings.cache_result_ttl_s, settings.cache_states_ttl_s),
    )


def build_service(
    settings: Settings,
    bundle: Bundle,
    metrics: EngineMetrics,
    runtime: Runtime,
    cache: CachePool | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> Service:
    manifest = bundle.manifest
    if settings.max_batch_tokens < manifest.max_length:
        raise ValueError(
            f"max_batch_tokens ({settings.max_batch_tokens}) must hold one input of the model's "
            f"maximum length ({manifest.max_length})"
        )
    single_threaded_blas()
    encoder = encoder_for(manifest, runtime)
    log.info("encoder %s on %s", encoder.file, runtime)
    runtimes = build_runtimes(settings, bundle, runtime, encoder)
    limits = batch_limits(settings, manifest, runtime)
    return Service(
        bundle=bundle,
        tokenizer=TextTokenizer(bundle.path(manifest.tokenizer), manifest.max_length),
        batcher=Batcher(
            runtimes,
            limits,
            metrics,
            cpus=runtime_cpus(settings.pin_runtime_threads, settings.runtimes, settings.intra_op_threads),
            wide=_wide_runtime(settings, bundle.path(encoder.file)) if runtime == "onnxruntime-cpu" else None,
            on_fatal=on_fatal,
            hang_timeout_s=settings.runtime_hang_timeout_s,
            verification=_verification(settings, manifest.attention),
            warm_up=_warm_up_plan(settings, runtime),
        ),
        metrics=metrics,
        limits=ServiceLimits(
            max_inputs=settings.max_inputs_per_request,
            max_input_chars=settings.max_input_chars,
            default_timeout_s=settings.request_timeout_s,
            max_document_tokens=settings.max_document_tokens,
        ),
        tokenizer_threads=settings.tokenizer_threads,
        cache=cache,
        coalesce=settings.coalesce,
    )


def build_runtimes(
    settings: Settings, bundle: Bundle, runtime: Runtime, encoder: EncoderSpec
) -> list[EncoderRuntime]:
    if runtime == "torch-cuda":
        from engine.runtime.torch_cuda import TorchEncoderRuntime, TorchOptions

        options = TorchOptions(TORCH_DEVICE, settings.torch_dtype, settings.cuda_graphs, GPU_MAX_BATCH_TOKENS)
        return [
            TorchEncoderRuntime(
                bundle.path(encoder.file), bundle.manifest.attention, options, name=f"{runtime}-{i}"
            )
            for i in range(settings.runtimes)
        ]
    return [
        OnnxEncoderRuntime(
            bundle.path(encoder.file),
            intra_op_threads=settings.intra_op_threads,
            name=f"{runtime}-{i}",
            providers=providers_for(runtime),
        )
        for i in range(settings.runtimes)
    ]


def batch_limits(settings: Settings, manifest: Manifest, runtime: Runtime) -> BatchLimits:
    """The queue's bounds and batch shapes (the queue simulation builds its own from here too).
    The size cap while the queue is shallow applies on a CPU only: a GPU's batches pay for
    themselves at any depth."""
    shallow = settings.shallow_batch_size if runtime not in GPU_RUNTIMES else 0
    return BatchLimits(
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_queue_items=settings.max_queue_items,
        max_queue_tokens=settings.max_queue_tokens,
        max_wait_s=settings.max_batch_wait_ms / 1000.0,
        length_boundaries=attention_boundaries(manifest.attention),
        shallow_max_batch_size=shallow or None,
    )


def _warm_up_plan(settings: Settings, runtime: Runtime) -> WarmUpPlan:
    """On a GPU the batch budget comes from the warm-up's measurements, unless set by hand:
    the CPU defaults (8192 tokens, 32 inputs) leave a GPU mostly idle."""
    if runtime not in GPU_RUNTIMES:
        return WarmUpPlan()
    explicit = {"max_batch_tokens", "max_batch_size"} & settings.model_fields_set
    return replace(GPU_WARM_UP, tune_budget=not explicit)


async def _start(service: Service) -> None:
    await service.start()
    # What start-up built lives as long as the process: keep it out of every later collection,
    # and collect the young generation less often (per request the server allocates many small
    # short-lived objects). In an A/B of the engine under load here this gave ~5% (noisy).
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _log_warm_up_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("warm-up failed; the server stays unready: %r", task.exception())


def _verification(settings: Settings, attention: AttentionSpec) -> AttentionVerification | None:
    """Sampled checks of what a sparse pattern keeps, on the batches its blocked form reads."""
    if attention.dense_limit is None or attention.window is None or settings.attention_verify_rate == 0:
        return None
    return AttentionVerification(settings.attention_verify_rate, attention.dense_limit)


def _wide_runtime(settings: Settings, model: Path) -> EncoderRuntime | None:
    """A session spanning every core the runtimes use, for lone batches on an idle machine."""
    cores = settings.runtimes * settings.intra_op_threads
    if not settings.wide_runtime or cores < 2:
        return None
    return OnnxEncoderRuntime(model, intra_op_threads=cores, name="wide")


def create_app(
    settings: Settings | None = None,
    bundle: Bundle | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """`bundle`: one already loaded and verified (the CLI checks it before it binds the port).
    `on_fatal(reason)`: called once if the encoder runtimes die or hang (the CLI then exits 3)."""
    settings = settings or Settings()
    # The *_created series would double every family and say nothing useful here.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    http_metrics = HttpMetrics(registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        loaded = bundle
        if loaded is None:
            loaded = await loop.run_in_executor(
                None, lambda: load_bundle(settings.bundle, allow_failed_gates=settings.allow_failed_gates)
            )
        cache = build_cache(settings, loaded, CacheMetrics(registry))
        machine = await loop.run_in_executor(None, probe_machine, loaded.manifest)
        runtime, why = choose_runtime(settings.runtime, loaded.manifest, machine)
        log.info("runtime %s (%s)", runtime, why)
        service = await loop.run_in_executor(
            None, build_service, settings, loaded, EngineMetrics(registry), runtime, cache, on_fatal
        )
        http_metrics.build.info(
            {
                "version": server_version(),
                "bundle": loaded.manifest.name,
                "bundle_version": loaded.manifest.version,
                "runtime": runtime,
                "precision": encoder_for(loaded.manifest, runtime).precision,
            }
        )
        app.state.service = service
        if runtime == "torch-cuda":
            registry.register(GpuMemoryCollector(torch_allocator_stats))
        elif runtime == "onnxruntime-cuda":
            registry.register(GpuMemoryCollector(nvml_stats))  # absent, not zero, on CPU
        # Warm up in the background: the port answers /health/live at once, /health/ready after.
        warm_up = asyncio.create_task(_start(service))
        warm_up.add_done_callback(_log_warm_up_failure)
        log.info("serving bundle %s (%s) from %s", loaded.manifest.name, loaded.manifest.version, loaded.root)
        grpc_server = None
        if settings.grpc:
            grpc_server = GrpcServer(
                lambda: app.state.service,
                lambda: not app.state.draining and service.unready_reason() is None,
                KeyRing.load(settings.api_keys, settings.api_keys_file),
                f"{settings.host}:{settings.grpc_port}",
                settings.max_request_bytes,
            )
            await grpc_server.start()
        try:
            yield
        finally:
            warm_up.cancel()
            if grpc_server is not None:
                await grpc_server.stop(settings.shutdown_grace_s)  # calls in flight finish first
            await service.close()

    # Docs that render offline: Swagger UI and ReDoc served from the fastapi-offline package.
    app = FastAPIOffline(
        title="sparsebert-serve",
        version=server_version(),
        description="Classification and NER from INT8 BERT encoders, with length-aware dynamic batching.",
        lifespan=lifespan,
        static_url=DOCS_ASSETS,
        # Off, FastAPI looks up three OpenTelemetry providers on every request to learn that
        # none is configured; this server's own telemetry is its Prometheus metrics.
        telemetry=None if settings.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.draining = False  # set on SIGTERM (server/lifecycle.py): readiness turns false at once
    install_error_handlers(app)
    # The routes join the app's own router instead of being included: FastAPI 0.165 resolves an
    # included router's routes on every request, through one more routing layer (measured on
    # cached answers: 0.25 -> 0.21 ms of server CPU a request, +13% requests/s). These routers
    # carry no prefix, dependencies or other include options, so nothing else changes. They go
    # first: a request is matched against the routes in order, and the task routes take the traffic.
    app.router.routes[:0] = router.routes
    if settings.admin_api:
        app.router.routes.extend(admin_router.routes)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # Outermost last: CORS answers preflights before auth; metrics see every answer, 401s too.
    app.add_middleware(CancelOnDisconnectMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(
        AccessMiddleware,
        keys=KeyRing.load(settings.api_keys, settings.api_keys_file),
        limits=RateLimits(
            settings.rate_limit_rps,
            settings.rate_limit_burst,
            settings.rate_limit_tokens_per_s,
            settings.rate_limit_token_burst,
        ),
        public_paths=(*settings.public_paths, DOCS_ASSETS),
    )
    app.add_middleware(
        RequestMetricsMiddleware, duration=http_metrics.request_seconds, in_flight=http_metrics.in_flight
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Cache-Control", "X-Request-Timeout"],
            expose_headers=[*TIMING_HEADERS, "x-cache-hits", "Retry-After"],
        )
    return app
