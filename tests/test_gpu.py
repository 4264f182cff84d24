"""GPU paths as far as a CPU machine allows: runtime selection and its errors, and the GPU
memory metrics against allocator statistics in torch's format. The on-GPU checks skip here
with the reason; they run where a CUDA device is (the device tool, when a task has one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from engine.gpu_metrics import GpuMemoryCollector, fragmentation_ratio
from engine.runtime.selection import RuntimeUnavailable, choose_runtime, providers_for
from loadtest.server_process import free_port

# The keys torch.cuda.memory_stats(0) reports (those the collector reads), with values of a
# plausible mixed-length load. Not recorded on a GPU: this task has none (see the README).
RECORDED = {
    "allocated_bytes.all.current": 412_090_368,
    "reserved_bytes.all.current": 1_073_741_824,
    "inactive_split_bytes.all.current": 268_435_456,
    "num_alloc_retries": 0,
}


def test_auto_picks_cuda_only_when_onnxruntime_offers_it() -> None:
    cpu_only = ["CPUExecutionProvider"]
    assert choose_runtime("auto", lambda: cpu_only)[0] == "onnxruntime-cpu"
    assert choose_runtime("auto", lambda: ["CUDAExecutionProvider", *cpu_only])[0] == "onnxruntime-cuda"
    assert choose_runtime("onnxruntime-cpu", lambda: ["CUDAExecutionProvider"])[0] == "onnxruntime-cpu"
    assert providers_for("onnxruntime-cuda")[0] == "CUDAExecutionProvider"
    with pytest.raises(RuntimeUnavailable, match=r"\[gpu\] extra"):
        choose_runtime("onnxruntime-cuda", lambda: cpu_only)


def test_a_runtime_asked_for_by_name_that_cannot_load_stops_start_up_in_one_line(bundle_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--bundle", str(bundle_dir), "--port", str(free_port()),
         "--no-grpc", "--runtime", "onnxruntime-cuda"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the refusal cannot be shown here")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "onnxruntime-cuda cannot load" in result.stderr


def test_gpu_memory_metrics_from_recorded_allocator_stats() -> None:
    assert fragmentation_ratio(RECORDED) == pytest.approx(0.25)
    registry = CollectorRegistry()
    registry.register(GpuMemoryCollector(lambda: {0: RECORDED}))
    text = generate_latest(registry).decode()
    assert 'sparsebert_gpu_memory_reserved_bytes{device="0"} 1.073741824e+09' in text
    assert 'sparsebert_gpu_memory_allocated_bytes{device="0"} 4.12090368e+08' in text
    assert 'sparsebert_gpu_memory_fragmentation_ratio{device="0"} 0.25' in text
    # NVML numbers: reserved only; no fragmentation ratio it cannot know.
    registry = CollectorRegistry()
    registry.register(GpuMemoryCollector(lambda: {1: {"reserved_bytes.all.current": 5}}))
    text = generate_latest(registry).decode()
    assert "reserved_bytes" in text and "fragmentation" not in text and "allocated" not in text
    # No device: the metrics are absent, not zero.
    registry = CollectorRegistry()
    registry.register(GpuMemoryCollector(dict))
    assert "gpu" not in generate_latest(registry).decode()


@pytest.mark.gpu
def test_cuda_runtime_matches_the_cpu_reference(bundle_dir: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("no CUDA execution provider on this machine: on-GPU verification needs a GPU host")
    from engine.bundle import load_bundle
    from engine.runtime.onnx import OnnxEncoderRuntime
    from engine.runtime.selection import encoder_for

    bundle = load_bundle(bundle_dir)
    model = bundle.path(encoder_for(bundle.manifest, "onnxruntime-cuda").file)  # the static QDQ graph
    ids = np.array([[101, 7592, 2088, 102, 0]], dtype=np.int64)
    mask = (ids > 0).astype(np.int64)
    cpu = OnnxEncoderRuntime(model).encode(ids, mask).states
    cuda = OnnxEncoderRuntime(model, providers=providers_for("onnxruntime-cuda")).encode(ids, mask).states
    assert np.abs(cpu - cuda)[mask.astype(bool)].max() < 0.05
