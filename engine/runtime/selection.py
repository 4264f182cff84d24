"""Which runtime serves: `--runtime auto` picks the best one this machine can load and says why;
a runtime asked for by name that cannot load fails start-up with one line, never a silent
fallback to something slower.

Implemented: ONNX Runtime on the CPU execution provider, and on the CUDA execution provider (the
`[gpu]` extra: onnxruntime-gpu with CUDA 13 and cuDNN 9). TensorRT and a torch-CUDA runtime are
not built yet (issue 8): asking for them is refused by the settings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from engine.bundle import EncoderSpec, Manifest
from engine.errors import BundleError

log = logging.getLogger(__name__)

RuntimeKind = Literal["auto", "onnxruntime-cpu", "onnxruntime-cuda"]
CUDA_PROVIDER = "CUDAExecutionProvider"


class RuntimeUnavailable(BundleError):
    """The runtime asked for cannot run here (start-up fails with this message)."""


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_runtime(
    requested: RuntimeKind, providers: Callable[[], list[str]] = available_providers
) -> tuple[Literal["onnxruntime-cpu", "onnxruntime-cuda"], str]:
    """(the runtime, why it was chosen)."""
    found = providers()
    if requested == "onnxruntime-cpu":
        return "onnxruntime-cpu", "asked for"
    if requested == "onnxruntime-cuda":
        if CUDA_PROVIDER not in found:
            raise RuntimeUnavailable(
                f"runtime onnxruntime-cuda cannot load: this onnxruntime has no {CUDA_PROVIDER} "
                f"(it has {', '.join(found)}); install the [gpu] extra (onnxruntime-gpu, CUDA 13, cuDNN 9)"
            )
        return "onnxruntime-cuda", "asked for"
    if CUDA_PROVIDER in found:
        return "onnxruntime-cuda", f"auto: onnxruntime offers {CUDA_PROVIDER}"
    return "onnxruntime-cpu", f"auto: no GPU execution provider in this onnxruntime ({', '.join(found)})"


def providers_for(kind: Literal["onnxruntime-cpu", "onnxruntime-cuda"]) -> list[str]:
    return [CUDA_PROVIDER, "CPUExecutionProvider"] if kind == "onnxruntime-cuda" else ["CPUExecutionProvider"]


# The bundle's graph each runtime reads, in order of preference: on a GPU the static QDQ graph
# (its INT8 is QuantizeLinear/DequantizeLinear pairs, which GPU providers and TensorRT run as
# INT8 kernels; the dynamic graph's quantization ops are CPU kernels), on a CPU the dynamic one.
ENCODER_PREFERENCE: dict[str, tuple[str, ...]] = {
    "onnxruntime-cpu": ("int8", "int8-qdq"),
    "onnxruntime-cuda": ("int8-qdq", "int8"),
}


def encoder_for(manifest: Manifest, kind: Literal["onnxruntime-cpu", "onnxruntime-cuda"]) -> EncoderSpec:
    """The encoder `kind` serves from the bundle: its preferred precision, else the first listed."""
    for precision in ENCODER_PREFERENCE[kind]:
        if precision in manifest.encoders:
            return manifest.encoders[precision]
    return next(iter(manifest.encoders.values()))
