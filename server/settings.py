"""The one settings object: every option is a CLI flag (`--max-batch-size`) and an env var
(`SPARSEBERT_MAX_BATCH_SIZE`). Defaults are the embedded ones: no Redis, the packaged model."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.runtime.affinity import PinMode
from engine.runtime.selection import RuntimeKind
from engine.runtime.torch_cuda import TorchDtype
from server.access import DEFAULT_PUBLIC_PATHS

DEFAULT_BUNDLE = Path("bundles/minilm-multitask")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SPARSEBERT_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="sparsebert serve",
        extra="ignore",
    )

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    grpc: bool = Field(True, description="Serve the gRPC API (server/rpc/sparsebert.proto) too.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="TCP port of the gRPC API.")
    bundle: Path = Field(DEFAULT_BUNDLE, description="Model bundle directory (with manifest.json).")
    build_missing_bundle: bool = Field(
        True, description="Build the default bundle from packaged weights if it is absent."
    )
    allow_failed_gates: bool = Field(
        False, description="Serve a bundle whose quality gates failed (never in production)."
    )
    runtime: RuntimeKind = Field(
        "auto",
        description="Encoder runtime: auto (the best this machine can load, logged), onnxruntime-cpu, "
        "onnxruntime-cuda (the [gpu] extra), torch-cuda (the [torch-cuda] extra and a bundle built "
        "with --gpu-graph). One asked for by name that cannot load fails start-up.",
    )
    torch_dtype: TorchDtype = Field(
        "float16",
        description="Compute type of the torch-cuda runtime: float16, bfloat16 (autocast; the weights "
        "stay FP32) or float32 (the plain baseline).",
    )
    cuda_graphs: bool = Field(
        True,
        description="torch-cuda: capture a CUDA graph per batch-size and length bucket at start-up "
        "(before ready); batches replay them instead of launching each kernel.",
    )
    runtimes: int = Field(
        2, ge=1, le=64, description="Encoder sessions run side by side (one worker thread each)."
    )
    intra_op_threads: int = Field(1, ge=1, le=64, description="Threads inside each session.")
    pin_runtime_threads: PinMode = Field(
        "auto",
        description="Pin each runtime thread to its own CPU: auto = only when the process owns no "
        "more CPUs than it has runtimes (a dedicated machine or cpuset container).",
    )
    wide_runtime: bool = Field(
        True,
        description="Keep one more session spanning all the runtimes' cores: a long batch that arrives "
        "while every runtime idles runs on all of them (lower latency at low load).",
    )
    tokenizer_threads: int = Field(1, ge=1, le=16, description="Tokenizer worker threads.")
    max_batch_size: int = Field(32, ge=1, le=1024, description="Most inputs in one batch.")
    max_batch_tokens: int = Field(
        8192, ge=512, description="Most padded tokens (inputs x longest) in one batch."
    )
    max_batch_wait_ms: float = Field(
        0.0, ge=0, le=1000, description="Hold a batch that could still grow for at most this long."
    )
    shallow_batch_size: int = Field(
        2,
        ge=0,
        le=1024,
        description="While fewer than 12 inputs wait, a batch holds at most this many (0: no such "
        "cap): the oldest inputs leave sooner (a tighter tail at moderate load). CPU runtimes only.",
    )
    attention_verify_rate: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Share of the batches a sparse encoder reads in its blocked form that also "
        "measure the dense attention mass its pattern keeps (sparsebert_attention_kept_mass_ratio; "
        "such a batch costs about one dense attention more). 0: never.",
    )
    max_queue_items: int = Field(256, ge=1, description="Inputs waiting at most; beyond: 429.")
    max_queue_tokens: int = Field(65536, ge=512, description="Tokens waiting at most; beyond: 429.")
    max_inputs_per_request: int = Field(64, ge=1, description="Texts in one request; beyond: 413.")
    max_input_chars: int = Field(500_000, ge=1, description="Characters in one text; beyond: 413.")
    max_document_tokens: int = Field(
        65_536, ge=512, description="Tokens in one text (long inputs are read in windows); beyond: 413."
    )
    max_request_bytes: int = Field(2_000_000, ge=1024, description="Request body size; beyond: 413.")
    request_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of a request without an X-Request-Timeout header."
    )
    runtime_hang_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A batch running longer than this (or 20x its predicted time) means a hung "
        "runtime: the server fails what waits, turns unready and exits with status 3 (for its "
        "orchestrator to restart it).",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long accepted requests may take to finish before exit."
    )
    cache: bool = Field(
        True, description="Cache results and encoder states (in process; in Redis too with a Redis URL)."
    )
    cache_l1_bytes: int = Field(
        128 * 1024 * 1024, ge=0, description="Size bound of the in-process cache tier in bytes (0: off)."
    )
    cache_redis_url: str | None = Field(
        None, description="Redis shared by every replica as the second cache tier (redis://host:6379/0)."
    )
    cache_namespace: str = Field(
        "sparsebert",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Prefix of every cache key: deployments sharing one Redis use different ones.",
    )
    cache_result_ttl_s: int = Field(3600, ge=1, description="Lifetime of a cached result.")
    cache_states_ttl_s: int = Field(600, ge=1, description="Lifetime of cached encoder states.")
    cache_redis_timeout_ms: float = Field(
        100.0, gt=0, le=10_000, description="Timeout of each Redis call; past it the lookup is a miss."
    )
    cache_redis_retry_s: float = Field(
        2.0, gt=0, description="After repeated Redis failures, skip Redis this long before probing it."
    )
    coalesce: bool = Field(True, description="Encode identical inputs that are in flight at once only once.")
    admin_api: bool = Field(
        False, description="Serve the admin routes (POST /admin/cache/flush). Keep them off the public port."
    )
    api_keys: list[str] = Field(
        [],
        description="API keys as `name:sha256hex` (append `:admin` for the admin routes); "
        "`sparsebert hash-key` prints the hash of a key. With none (and no file) the server is open.",
    )
    api_keys_file: Path | None = Field(None, description="A file of API key entries, one per line.")
    public_paths: list[str] = Field(
        list(DEFAULT_PUBLIC_PATHS), description="Paths that need no API key and are not rate limited."
    )
    rate_limit_rps: float | None = Field(
        None, gt=0, description="Requests per second per caller (API key, or client address); beyond: 429."
    )
    rate_limit_burst: float = Field(20.0, ge=1, description="Requests a caller may send at once.")
    rate_limit_tokens_per_s: float | None = Field(
        None, gt=0, description="Model tokens per second per caller; beyond: 429 until the debt is repaid."
    )
    rate_limit_token_burst: float = Field(20_000.0, ge=1, description="Tokens a caller may use at once.")
    cors_origins: list[str] = Field([], description="Origins allowed by CORS (none: CORS off).")
    opentelemetry: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry spans, metrics and logs, through the global "
        "providers (e.g. under opentelemetry-instrument). Off: no provider checks on every request.",
    )
    log_level: str = Field("info", description="uvicorn log level.")

    @model_validator(mode="after")
    def _batch_fits_longest_input(self) -> Settings:
        if self.max_queue_items < self.max_inputs_per_request:
            raise ValueError("max_queue_items must be at least max_inputs_per_request")
        return self
