"""ONNX export of the torch encoder and per-channel dynamic INT8 quantization with hybrid precision."""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from models.bert import BertEncoder, EncoderWithSparsity

OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask")
QUANTIZATION = "onnxruntime dynamic, per-channel QInt8 weights, uint8 activations"


def export_onnx(model: BertEncoder, path: Path) -> None:
    """Dynamic batch and sequence axes; inputs input_ids and attention_mask (int64); outputs
    last_hidden_state and, for a sparse encoder, each sequence's sparsity ratio [batch]."""
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]]) % model.config.vocab_size
    mask = (ids != 0).to(torch.int64)
    axes = {0: "batch", 1: "sequence"}
    dynamic_axes = {name: axes for name in (*INPUT_NAMES, "last_hidden_state")}
    module: torch.nn.Module = model
    outputs = ["last_hidden_state"]
    if model.pattern.sparse:
        module = EncoderWithSparsity(model)
        outputs.append("sparsity")
        dynamic_axes["sparsity"] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(
            module,
            (ids, mask),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))


def quantize_int8(fp32_path: Path, int8_path: Path, keep_fp32: list[str] | None = None) -> None:
    """Per-channel dynamic INT8 weights. Per-tensor drifts badly on MiniLM (cosine 0.96 vs 0.99)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer suggests shape pre-processing on every call
    try:
        _quantize(fp32_path, int8_path, keep_fp32)
    finally:
        root.setLevel(level)


def _quantize(fp32_path: Path, int8_path: Path, keep_fp32: list[str] | None) -> None:
    quantize_dynamic(
        str(fp32_path),
        str(int8_path),
        per_channel=True,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=keep_fp32 or [],
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def ffn_down_projections(fp32_path: Path) -> list[str]:
    """The MatMuls of each layer's FFN output projection: the usual INT8-sensitive spots in BERT."""
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    return [
        node.name for node in graph.node if node.op_type == "MatMul" and node.name.endswith("/dense_1/MatMul")
    ]


@dataclass(frozen=True)
class SensitivityResult:
    keep_fp32: list[str]
    score: float
    trials: dict[str, float]


def quantize_with_sensitivity(
    fp32_path: Path,
    int8_path: Path,
    score: Callable[[Path], float],
    candidates: list[str],
    target: float,
) -> SensitivityResult:
    """Quantize everything; if `score` (on dev data) misses `target`, keep in FP32 the candidate
    layers whose FP32 precision helps most, one at a time, until it holds."""
    quantize_int8(fp32_path, int8_path)
    baseline = score(int8_path)
    trials = {"all int8": baseline}
    if baseline >= target:
        return SensitivityResult([], baseline, trials)
    with tempfile.TemporaryDirectory() as tmp:
        trial_path = Path(tmp) / "trial.onnx"
        for node in candidates:
            quantize_int8(fp32_path, trial_path, [node])
            trials[node] = score(trial_path)
    ranked = sorted(candidates, key=lambda node: trials[node], reverse=True)
    kept: list[str] = []
    best = baseline
    for node in ranked:
        kept.append(node)
        quantize_int8(fp32_path, int8_path, kept)
        best = score(int8_path)
        trials[" + ".join(kept)] = best
        if best >= target:
            break
    return SensitivityResult(kept, best, trials)
