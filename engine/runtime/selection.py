"""Which runtime serves: `--runtime auto` picks the best one this machine can load and says why;
a runtime asked for by name that cannot load fails start-up with one line, never a silent
fallback to something slower.

Runtimes: ONNX Runtime on the CPU execution provider (the bundle's dynamic INT8 graph); ONNX
Runtime on the CUDA execution provider (the `[gpu]` extra: onnxruntime-gpu with CUDA 13 and
cuDNN 9; the static QDQ INT8 graph); torch on a CUDA GPU (the `[torch-cuda]` extra: the student's
torch weights in FP16/BF16, fused attention, CUDA graphs; engine/runtime/torch_cuda.py).
`auto` prefers torch-cuda on a GPU: ONNX Runtime's CUDA provider has no INT8 GEMM for the QDQ
graph's pairs (it dequantizes and multiplies in FP32), where torch computes in FP16 with fused
attention. TensorRT is not built (issue 8: no TensorRT can be installed here).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from typing import Literal

from engine.bundle import EncoderSpec, Manifest
from engine.errors import BundleError

log = logging.getLogger(__name__)

RuntimeKind = Literal["auto", "onnxruntime-cpu", "onnxruntime-cuda", "torch-cuda"]
Runtime = Literal["onnxruntime-cpu", "onnxruntime-cuda", "torch-cuda"]
GPU_RUNTIMES: frozenset[Runtime] = frozenset({"onnxruntime-cuda", "torch-cuda"})
CUDA_PROVIDER = "CUDAExecutionProvider"
# The bundle's encoder key for the torch runtime's weights (written by `sparsebert build --gpu-graph`).
TORCH_ENCODER = "torch-fp16"
# Both distributions install the one `onnxruntime` module, each over the other's files: with both
# present the CUDA provider is often missing (microsoft/onnxruntime#26996). pip cannot drop a base
# dependency for an extra, so `.[gpu]` brings both, and the GPU image swaps them.
ORT_CLASH = (
    "onnxruntime and onnxruntime-gpu are both installed and share one module, so the CUDA provider "
    "may be missing; keep onnxruntime-gpu alone: pip uninstall -y onnxruntime onnxruntime-gpu && "
    "pip install --no-deps onnxruntime-gpu==<its version>"
)


class RuntimeUnavailable(BundleError):
    """The runtime asked for cannot run here (start-up fails with this message)."""


@dataclass(frozen=True)
class Machine:
    """What this machine can run: ONNX Runtime's execution providers, and the CUDA GPU torch
    sees (None, with the reason, where torch is absent or has no GPU)."""

    providers: tuple[str, ...]
    torch_gpu: str | None = None
    torch_missing: str = "not probed"
    ort_clash: bool = False  # onnxruntime and onnxruntime-gpu both installed


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def probe_machine(manifest: Manifest) -> Machine:
    """Probed once at start-up. torch is imported only for a bundle that has torch weights."""
    import onnxruntime as ort

    providers = tuple(ort.get_available_providers())
    clash = installed("onnxruntime") and installed("onnxruntime-gpu")
    if clash:
        log.warning(ORT_CLASH)
    if TORCH_ENCODER not in manifest.encoders:
        return Machine(providers, None, "the bundle has no torch weights (build it with --gpu-graph)", clash)
    if importlib.util.find_spec("torch") is None:
        return Machine(providers, None, "torch is not installed (the [torch-cuda] extra)", clash)
    import torch

    if not torch.cuda.is_available():
        return Machine(providers, None, f"torch {torch.__version__} sees no CUDA device", clash)
    return Machine(providers, torch.cuda.get_device_name(0), ort_clash=clash)


def choose_runtime(requested: RuntimeKind, manifest: Manifest, machine: Machine) -> tuple[Runtime, str]:
    """(the runtime, why it was chosen); RuntimeUnavailable for one asked for that cannot load."""
    if requested == "onnxruntime-cpu":
        return "onnxruntime-cpu", "asked for"
    if requested == "onnxruntime-cuda":
        if CUDA_PROVIDER not in machine.providers:
            fix = (
                ORT_CLASH
                if machine.ort_clash
                else "install the [gpu] extra (onnxruntime-gpu, CUDA 13, cuDNN 9)"
            )
            raise RuntimeUnavailable(
                f"runtime onnxruntime-cuda cannot load: this onnxruntime has no {CUDA_PROVIDER} "
                f"(it has {', '.join(machine.providers)}); {fix}"
            )
        return "onnxruntime-cuda", "asked for"
    if requested == "torch-cuda":
        if machine.torch_gpu is None:
            raise RuntimeUnavailable(f"runtime torch-cuda cannot load: {machine.torch_missing}")
        return "torch-cuda", f"asked for, on {machine.torch_gpu}"
    if machine.torch_gpu is not None:
        return "torch-cuda", f"auto: torch sees {machine.torch_gpu} and the bundle has torch weights"
    if CUDA_PROVIDER in machine.providers:
        return (
            "onnxruntime-cuda",
            f"auto: onnxruntime offers {CUDA_PROVIDER} (torch-cuda: {machine.torch_missing})",
        )
    clash = f"; {ORT_CLASH}" if machine.ort_clash else ""
    return (
        "onnxruntime-cpu",
        f"auto: no GPU runtime (onnxruntime offers {', '.join(machine.providers)}; "
        f"torch-cuda: {machine.torch_missing}{clash})",
    )


def providers_for(kind: Runtime) -> list[str]:
    return [CUDA_PROVIDER, "CPUExecutionProvider"] if kind == "onnxruntime-cuda" else ["CPUExecutionProvider"]


# The bundle's encoder each runtime reads, in order of preference: on ONNX Runtime's CUDA provider
# the static QDQ graph (its INT8 is QuantizeLinear/DequantizeLinear pairs, which GPU providers and
# TensorRT read; the dynamic graph's quantization ops are CPU kernels), on a CPU the dynamic one;
# torch reads its own weights only.
ENCODER_PREFERENCE: dict[Runtime, tuple[str, ...]] = {
    "onnxruntime-cpu": ("int8", "int8-qdq"),
    "onnxruntime-cuda": ("int8-qdq", "int8"),
    "torch-cuda": (TORCH_ENCODER,),
}


def encoder_for(manifest: Manifest, kind: Runtime) -> EncoderSpec:
    """The encoder `kind` serves from the bundle: its preferred one, else (ONNX Runtime) any ONNX graph."""
    for key in ENCODER_PREFERENCE[kind]:
        if key in manifest.encoders:
            return manifest.encoders[key]
    onnx_graphs = [spec for key, spec in manifest.encoders.items() if key != TORCH_ENCODER]
    if kind == "torch-cuda" or not onnx_graphs:
        raise RuntimeUnavailable(f"bundle {manifest.name} has no encoder runtime {kind} can read")
    return onnx_graphs[0]
