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

from engine.bundle import load_bundle
from engine.gpu_metrics import UTILIZATION, GpuMemoryCollector, fragmentation_ratio
from engine.runtime.selection import (
    Machine,
    RuntimeUnavailable,
    choose_runtime,
    encoder_for,
    installed,
    providers_for,
)
from loadtest.server_process import free_port
from tests.vectors import row_cosines

# The keys torch.cuda.memory_stats(0) reports (those the collector reads), with values of a
# plausible mixed-length load. Not recorded on a GPU: this task has none (see the README).
RECORDED = {
    "allocated_bytes.all.current": 412_090_368,
    "reserved_bytes.all.current": 1_073_741_824,
    "inactive_split_bytes.all.current": 268_435_456,
    "num_alloc_retries": 3,
    "num_ooms": 0,
    UTILIZATION: 87,  # NVML's percent, merged in by torch_allocator_stats
}


CPU_ONLY = ("CPUExecutionProvider",)
CUDA_EP = ("CUDAExecutionProvider", *CPU_ONLY)


def test_auto_picks_the_best_runtime_the_machine_and_bundle_allow(bundle_dir: Path) -> None:
    manifest = load_bundle(bundle_dir).manifest
    no_torch = "the bundle has no torch weights (build it with --gpu-graph)"
    assert choose_runtime("auto", manifest, Machine(CPU_ONLY, None, no_torch))[0] == "onnxruntime-cpu"
    kind, why = choose_runtime("auto", manifest, Machine(CUDA_EP, None, no_torch))
    assert kind == "onnxruntime-cuda" and no_torch in why  # says why torch-cuda was passed over
    kind, why = choose_runtime("auto", manifest, Machine(CUDA_EP, "NVIDIA H100"))
    assert kind == "torch-cuda" and "H100" in why
    assert (
        choose_runtime("onnxruntime-cpu", manifest, Machine(CUDA_EP, "NVIDIA H100"))[0] == "onnxruntime-cpu"
    )
    assert providers_for("onnxruntime-cuda")[0] == "CUDAExecutionProvider"
    assert providers_for("torch-cuda") == ["CPUExecutionProvider"]  # never used: torch reads its own file
    with pytest.raises(RuntimeUnavailable, match=r"\[gpu\] extra"):
        choose_runtime("onnxruntime-cuda", manifest, Machine(CPU_ONLY))
    with pytest.raises(RuntimeUnavailable, match=r"torch-cuda cannot load: torch 2\.13\.0 sees no CUDA"):
        choose_runtime("torch-cuda", manifest, Machine(CPU_ONLY, None, "torch 2.13.0 sees no CUDA device"))


def test_both_onnxruntime_distributions_installed_is_named_with_its_fix(bundle_dir: Path) -> None:
    """pip cannot drop `onnxruntime` for the [gpu] extra; with both installed the CUDA provider is
    often missing, and the refusal (or auto's reason) must say why and how to mend it."""
    manifest = load_bundle(bundle_dir).manifest
    clashing = Machine(CPU_ONLY, None, "torch is not installed", ort_clash=True)
    with pytest.raises(
        RuntimeUnavailable, match=r"both installed.*pip uninstall -y onnxruntime onnxruntime-gpu"
    ):
        choose_runtime("onnxruntime-cuda", manifest, clashing)
    kind, why = choose_runtime("auto", manifest, clashing)
    assert kind == "onnxruntime-cpu" and "both installed" in why
    assert "both installed" not in choose_runtime("auto", manifest, Machine(CPU_ONLY, None, "x"))[1]
    assert installed("onnxruntime") and not installed("sparsebert-no-such-distribution")


def test_the_probe_imports_torch_only_for_a_bundle_with_torch_weights(bundle_dir: Path) -> None:
    """The default bundle is CPU-only: probing it must not pay torch's import (~1 s, ~200 MB)."""
    script = (
        "import sys; from pathlib import Path; from engine.bundle import load_bundle; "
        "from engine.runtime.selection import probe_machine; "
        f"machine = probe_machine(load_bundle(Path({str(bundle_dir)!r})).manifest); "
        "print(machine.torch_gpu, machine.torch_missing, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "None the bundle has no torch weights (build it with --gpu-graph) False"


def test_torch_cuda_reads_only_torch_weights(bundle_dir: Path) -> None:
    manifest = load_bundle(bundle_dir).manifest
    assert encoder_for(manifest, "onnxruntime-cuda").file == "encoder.int8.onnx"  # no QDQ graph: the INT8 one
    with pytest.raises(RuntimeUnavailable, match="no encoder runtime torch-cuda can read"):
        encoder_for(manifest, "torch-cuda")


def _serve_asking_for(runtime: str, bundle_dir: Path) -> subprocess.CompletedProcess[str]:
    """`sparsebert serve --runtime <runtime>`, for a runtime that cannot load here: it exits."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--bundle", str(bundle_dir), "--port", str(free_port()),
         "--no-grpc", "--runtime", runtime],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_a_runtime_asked_for_by_name_that_cannot_load_stops_start_up_in_one_line(bundle_dir: Path) -> None:
    result = _serve_asking_for("onnxruntime-cuda", bundle_dir)
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the refusal cannot be shown here")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "onnxruntime-cuda cannot load" in result.stderr


def test_torch_cuda_asked_for_with_a_cpu_bundle_stops_start_up_in_one_line(bundle_dir: Path) -> None:
    result = _serve_asking_for("torch-cuda", bundle_dir)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: runtime torch-cuda cannot load: the bundle has no torch weights (build it with --gpu-graph)"
    )


def test_gpu_memory_metrics_from_recorded_allocator_stats() -> None:
    assert fragmentation_ratio(RECORDED) == pytest.approx(0.25)
    registry = CollectorRegistry()
    registry.register(GpuMemoryCollector(lambda: {0: RECORDED}))
    text = generate_latest(registry).decode()
    assert 'sparsebert_gpu_memory_reserved_bytes{device="0"} 1.073741824e+09' in text
    assert 'sparsebert_gpu_memory_allocated_bytes{device="0"} 4.12090368e+08' in text
    assert 'sparsebert_gpu_memory_fragmentation_ratio{device="0"} 0.25' in text
    assert 'sparsebert_gpu_memory_alloc_retries_total{device="0"} 3.0' in text
    assert 'sparsebert_gpu_memory_ooms_total{device="0"} 0.0' in text
    assert 'sparsebert_gpu_utilization_ratio{device="0"} 0.87' in text
    # NVML numbers: reserved only; no fragmentation ratio it cannot know.
    registry = CollectorRegistry()
    registry.register(GpuMemoryCollector(lambda: {1: {"reserved_bytes.all.current": 5}}))
    text = generate_latest(registry).decode()
    assert "reserved_bytes" in text and "fragmentation" not in text and "allocated" not in text
    assert "retries" not in text and "utilization" not in text
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


GPU_BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "minilm-multitask-gpu"


def _torch_gpu_or_skip() -> Path:
    """The --gpu-graph bundle, on a machine where torch sees a GPU (else the test skips, saying why)."""
    torch = pytest.importorskip("torch", reason="torch is not installed: the [torch-cuda] extra")
    if not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} sees no CUDA device: on-GPU verification needs a GPU host")
    if not (GPU_BUNDLE / "manifest.json").is_file():
        pytest.fail(f"no GPU bundle at {GPU_BUNDLE}: run `make train-gpu` (or copy one there) first")
    return GPU_BUNDLE


def _real_texts() -> list[str]:
    """CoNLL test sentences (the dense branch) and BBC test articles long enough for the sparse one."""
    from models.data import bbc, conll

    sentences = [" ".join(s.words) for s in conll.load_split("test")[:96]]
    articles = [a.text for a in bbc.load_splits()["test"] if len(a.text.split()) > 420][:6]
    return sentences + articles


@pytest.mark.gpu
def test_torch_cuda_matches_the_cpu_fp32_reference_on_the_real_bundle() -> None:
    bundle_dir = _torch_gpu_or_skip()
    from engine.runtime.base import pad_batch
    from engine.runtime.torch_cuda import TorchDtype, TorchEncoderRuntime, TorchOptions
    from engine.tokenization import TextTokenizer

    bundle = load_bundle(bundle_dir)
    weights = bundle.path(encoder_for(bundle.manifest, "torch-cuda").file)
    attention = bundle.manifest.attention
    tokenizer = TextTokenizer(bundle.path(bundle.manifest.tokenizer), bundle.manifest.max_length)
    tokens = sorted(tokenizer.encode_batch(_real_texts()), key=lambda t: t.length)
    assert tokens[-1].length > (attention.dense_limit or 0), "no input reaches the sparse branch"
    reference = TorchEncoderRuntime(weights, attention, TorchOptions("cpu", "float32", cuda_graphs=False))
    # Stated tolerance, token states against FP32: mean cosine >= 0.999, and every token >= 0.99 in
    # FP16 or >= 0.97 in BF16 (3 fewer mantissa bits; BF16 autocast on this CPU gave min 0.982,
    # mean 0.9999 on these texts).
    tolerances: tuple[tuple[TorchDtype, float], ...] = (("float16", 0.99), ("bfloat16", 0.97))
    for dtype, floor in tolerances:
        gpu = TorchEncoderRuntime(weights, attention, TorchOptions("cuda", dtype, cuda_graphs=True))
        cosines: list[float] = []
        for start in range(0, len(tokens), 8):
            chunk = tokens[start : start + 8]
            ids, mask = pad_batch([t.ids for t in chunk], chunk[-1].length)
            a, b = reference.encode(ids, mask).states, gpu.encode(ids, mask).states
            real = mask.astype(bool)
            a, b = a[real], b[real]
            cosines.extend(row_cosines(a, b))
        assert min(cosines) > floor and float(np.mean(cosines)) > 0.999, dtype


@pytest.mark.gpu
def test_the_server_on_torch_cuda_answers_as_the_cpu_one_and_exports_gpu_memory() -> None:
    bundle_dir = _torch_gpu_or_skip()
    from tests.conftest import start_server

    texts = _real_texts()[:24]
    answers = {}
    for runtime in ("torch-cuda", "onnxruntime-cpu"):
        for client in start_server(bundle_dir, "--runtime", runtime, "--no-grpc", "--no-cache"):
            sentiment = client.post("/v1/classify", json={"inputs": texts})
            entities = client.post("/v1/ner", json={"inputs": texts, "aggregation_strategy": "simple"})
            assert sentiment.status_code == entities.status_code == 200
            answers[runtime] = (
                [r["labels"][0]["label"] for r in sentiment.json()["results"]],
                [
                    [(e["entity_group"], e["start"]) for e in r["entities"]]
                    for r in entities.json()["results"]
                ],
            )
            metrics = client.get("/metrics").text
            assert f'runtime="{runtime}"' in metrics
            on_gpu = runtime == "torch-cuda"
            assert ('sparsebert_gpu_memory_fragmentation_ratio{device="0"}' in metrics) == on_gpu
    agree = np.mean(
        [a == b for a, b in zip(answers["torch-cuda"][0], answers["onnxruntime-cpu"][0], strict=True)]
    )
    assert agree >= 0.9  # INT8 on the CPU against FP16 on the GPU: borderline sentences may differ
    same_entities = np.mean(
        [a == b for a, b in zip(answers["torch-cuda"][1], answers["onnxruntime-cpu"][1], strict=True)]
    )
    assert same_entities >= 0.8
