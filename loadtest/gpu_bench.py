"""`sparsebert bench --suite gpu`: every runtime this machine can load, through the server, against
plain torch FP32 eager on the same GPU, in one run (issue 8's verification; needs a CUDA host and
a bundle built with --gpu-graph, e.g. `make train-gpu`).

For each setup: closed-loop clients at each concurrency on the mixed-length benchmark workload,
req/s, tokens/s (real tokens), p50/p99, and the GPU memory metrics the server exports after that
load (reserved, allocated, fragmentation, allocation retries). A setup that cannot load here is
reported with the one line the server would refuse it with, not left out silently.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from engine.bundle import load_bundle
from engine.errors import BundleError
from engine.runtime.selection import RuntimeKind, choose_runtime, probe_machine
from engine.tokenization import TextTokenizer
from loadtest.closed_loop import LoadResult, closed_loop, run_on_uvloop
from loadtest.server_process import start_server, stop_server
from loadtest.workload import load_workload

BASELINE = "torch fp32 eager"
# name -> (runtime, extra server flags). The baseline is the same server on plain torch: FP32,
# no CUDA graphs (SDPA stays: it is torch's own attention).
SETUPS: dict[str, tuple[RuntimeKind, tuple[str, ...]]] = {
    BASELINE: ("torch-cuda", ("--torch-dtype", "float32", "--no-cuda-graphs")),
    "torch-cuda fp16 + graphs": ("torch-cuda", ()),
    "torch-cuda bf16 + graphs": ("torch-cuda", ("--torch-dtype", "bfloat16")),
    "onnxruntime-cuda (qdq int8)": ("onnxruntime-cuda", ()),
    "onnxruntime-cpu (int8)": ("onnxruntime-cpu", ()),
}
GPU_METRICS = (
    "sparsebert_gpu_memory_reserved_bytes",
    "sparsebert_gpu_memory_allocated_bytes",
    "sparsebert_gpu_memory_fragmentation_ratio",
    "sparsebert_gpu_memory_alloc_retries",
    "sparsebert_gpu_utilization_ratio",
)


@dataclass
class SetupResult:
    setup: str
    unavailable: str | None = None
    points: list[LoadResult] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    gpu: dict[str, float] = field(default_factory=dict)


def gpu_metrics(port: int) -> dict[str, float]:
    """The GPU families of /metrics, device 0 (absent on a CPU runtime)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("device") == "0" and any(sample.name.startswith(n) for n in GPU_METRICS):
                found[sample.name] = sample.value
    return found


def run(bundle_dir: Path, port: int, levels: list[int], duration_s: float, out: Path) -> list[SetupResult]:
    bundle = load_bundle(bundle_dir)
    machine = probe_machine(bundle.manifest)
    texts = load_workload()
    tokenizer = TextTokenizer(bundle.path(bundle.manifest.tokenizer), bundle.manifest.max_length)
    mean_tokens = sum(t.length for t in tokenizer.encode_batch(texts)) / len(texts)
    print(f"gpu suite: {bundle_dir}, {len(texts)} texts of {mean_tokens:.0f} tokens on average", flush=True)
    results = []
    for name, (runtime, flags) in SETUPS.items():
        result = SetupResult(name)
        results.append(result)
        try:
            choose_runtime(runtime, bundle.manifest, machine)
        except BundleError as refused:
            result.unavailable = str(refused)
            print(f"  {name:28} unavailable: {refused}", flush=True)
            continue
        process = start_server(
            bundle_dir, port, ("--runtime", runtime, "--no-cache", "--no-coalesce", *flags)
        )
        try:
            run_on_uvloop(closed_loop(port, texts, 4, name, duration_s=2.0))  # warm connections
            for level in levels:
                point = run_on_uvloop(closed_loop(port, texts, level, name, duration_s=duration_s))
                result.points.append(point)
                result.tokens_per_s.append(round(point.rps * mean_tokens, 1))
                print(
                    f"  {name:28} c={level:<3} {point.rps:8.1f} req/s "
                    f"{result.tokens_per_s[-1]:10.0f} tokens/s p50 {point.p50_ms:7.2f} ms "
                    f"p99 {point.p99_ms:7.2f} ms errors {point.errors}",
                    flush=True,
                )
            result.gpu = gpu_metrics(port)
        finally:
            stop_server(process)
    _print_table(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results


def _print_table(results: list[SetupResult]) -> None:
    baseline = next((r for r in results if r.setup == BASELINE and r.points), None)
    print("\n| setup | concurrency | req/s | tokens/s | p50 ms | p99 ms | errors | / torch fp32 eager |")
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        if result.unavailable:
            print(f"| {result.setup} | | | | | | | unavailable: {result.unavailable} |")
            continue
        for point, tokens in zip(result.points, result.tokens_per_s, strict=True):
            base = (
                next((p for p in baseline.points if p.concurrency == point.concurrency), None)
                if baseline
                else None
            )
            ratio = f"{point.rps / base.rps:.2f}" if base else "n/a"
            print(
                f"| {result.setup} | {point.concurrency} | {point.rps} | {tokens:.0f} | {point.p50_ms} "
                f"| {point.p99_ms} | {point.errors} | {ratio} |"
            )
    for result in results:
        if result.gpu:
            print(f"{result.setup}: after its load: {result.gpu}")
