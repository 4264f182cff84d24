"""ONNX Runtime on the CPU execution provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine.runtime.base import RuntimeOutput
from engine.runtime.selection import RuntimeUnavailable

# A sparse encoder's graph contract beyond input_ids/attention_mask -> last_hidden_state (written by
# models/export.py): its sparsity ratio and kept dense attention mass, and the verify switch.
SPARSITY_OUTPUT = "sparsity"
KEPT_MASS_OUTPUT = "kept_attention_mass"
OPTIONAL_OUTPUTS = (SPARSITY_OUTPUT, KEPT_MASS_OUTPUT)
VERIFY_INPUT = "verify"


class OnnxEncoderRuntime:
    """One InferenceSession. Several of these with one intra-op thread each, run side by side,
    beat one session with several threads on small shapes (measured: 1.3-1.6x)."""

    def __init__(
        self,
        model_path: Path,
        *,
        intra_op_threads: int = 1,
        name: str = "onnx",
        providers: list[str] | None = None,
    ) -> None:
        """`providers`: ONNX Runtime execution providers in order of preference (default: CPU).
        The first must really load: ONNX Runtime falls back to the CPU silently when CUDA's
        libraries are missing, and that fallback is refused here."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning threads burn the cores that the other sessions and the HTTP loop need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No CPU memory arena: it keeps the peak of every shape seen (after the warm-up sweep up to
        # 16 x 512, 659 MB per session against 149 MB without; the server's RSS 1.9 GB -> ~0.5 GB)
        # for ~3% on an 8 x 64 batch, within this machine's noise.
        options.enable_cpu_mem_arena = False
        wanted = providers or ["CPUExecutionProvider"]
        self._session = ort.InferenceSession(str(model_path), options, providers=wanted)
        if wanted[0] not in self._session.get_providers():
            raise RuntimeUnavailable(
                f"{wanted[0]} did not load for {model_path.name} (ONNX Runtime fell back to "
                f"{', '.join(self._session.get_providers())}); check the CUDA and cuDNN libraries"
            )
        self.name = name
        produced = {output.name for output in self._session.get_outputs()}
        self._outputs = ["last_hidden_state", *(name for name in OPTIONAL_OUTPUTS if name in produced)]
        self._verifies = VERIFY_INPUT in {graph_input.name for graph_input in self._session.get_inputs()}

    def encode(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, verify: bool = False
    ) -> RuntimeOutput:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._verifies:
            feed[VERIFY_INPUT] = np.array(verify)
        outputs = dict(zip(self._outputs, self._session.run(self._outputs, feed), strict=True))
        return RuntimeOutput(
            np.asarray(outputs["last_hidden_state"]),
            _optional(outputs.get(SPARSITY_OUTPUT)),
            _optional(outputs.get(KEPT_MASS_OUTPUT)) if verify else None,
        )


def _optional(value: object) -> np.ndarray | None:
    return None if value is None else np.asarray(value)
