"""ONNX export of the torch encoder, and INT8 quantization with hybrid precision: per-channel
dynamic INT8 for CPUs, and a statically calibrated QDQ graph for GPUs (TensorRT reads its
QuantizeLinear/DequantizeLinear pairs as INT8 kernels; ONNX Runtime runs it on any provider)."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from engine.runtime.onnx import KEPT_MASS_OUTPUT, SPARSITY_OUTPUT, VERIFY_INPUT
from models.bert import BertEncoder, EncoderWithSparsity

OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask")
QUANTIZATION = "onnxruntime dynamic, per-channel QInt8 weights, uint8 activations"
QDQ_QUANTIZATION = (
    "onnxruntime static QDQ, per-channel symmetric QInt8 weights, symmetric QInt8 activations "
    "(percentile 99.999 calibration on 128-token windows of training text); projections and embeddings"
)
CALIBRATION_TOKENS = 128
CALIBRATION_BATCH = 8


def export_onnx(model: BertEncoder, path: Path) -> None:
    """Dynamic batch and sequence axes; inputs input_ids and attention_mask (int64); outputs
    last_hidden_state and, for a sparse encoder, each sequence's sparsity ratio [batch] and kept
    dense attention mass [batch] (measured when its `verify` input is true)."""
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]]) % model.config.vocab_size
    mask = (ids != 0).to(torch.int64)
    axes = {0: "batch", 1: "sequence"}
    dynamic_axes = {name: axes for name in (*INPUT_NAMES, "last_hidden_state")}
    module: torch.nn.Module = model
    inputs: tuple[torch.Tensor, ...] = (ids, mask)
    input_names = list(INPUT_NAMES)
    outputs = ["last_hidden_state"]
    if model.pattern.sparse:
        module = EncoderWithSparsity(model)
        inputs = (ids, mask, torch.tensor(False))
        input_names.append(VERIFY_INPUT)
        outputs += [SPARSITY_OUTPUT, KEPT_MASS_OUTPUT]
        dynamic_axes[SPARSITY_OUTPUT] = {0: "batch"}
        dynamic_axes[KEPT_MASS_OUTPUT] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(
            module,
            inputs,
            str(path),
            input_names=input_names,
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizers log a shape pre-processing hint on every call, and its
    calibrators print their progress."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def quantize_int8(fp32_path: Path, int8_path: Path, keep_fp32: list[str] | None = None) -> None:
    """Per-channel dynamic INT8 weights. Per-tensor drifts badly on MiniLM (cosine 0.96 vs 0.99)."""
    with _quiet():
        quantize_dynamic(
            str(fp32_path),
            str(int8_path),
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=keep_fp32 or [],
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


class _Windows(CalibrationDataReader):  # type: ignore[misc]
    """Batches of equal-length windows: ONNX Runtime's histogram calibrators stack every batch's
    activations, so every batch must have one shape (and real text, no padding, fills them)."""

    def __init__(self, windows: np.ndarray, feeds_verify: bool) -> None:
        self._batches = [
            windows[i : i + CALIBRATION_BATCH] for i in range(0, len(windows), CALIBRATION_BATCH)
        ]
        self._feeds_verify = feeds_verify

    def get_next(self) -> dict[str, np.ndarray] | None:
        if not self._batches:
            return None
        ids = self._batches.pop(0)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if self._feeds_verify:
            feed[VERIFY_INPUT] = np.array(False)
        return feed


def calibration_windows(sequences: list[np.ndarray], cls_id: int, sep_id: int, most: int) -> np.ndarray:
    """[n, CALIBRATION_TOKENS] int64 windows cut from token id sequences (special tokens
    stripped, then joined), each [CLS] ... [SEP]; n <= `most`, a multiple of the calibration batch
    (0 when the text is too short for one batch)."""
    stream = np.concatenate([s[1:-1] for s in sequences])
    body = CALIBRATION_TOKENS - 2
    count = min(len(stream) // body, most) // CALIBRATION_BATCH * CALIBRATION_BATCH
    bodies = stream[: count * body].reshape(count, body)
    return np.concatenate([np.full((count, 1), cls_id), bodies, np.full((count, 1), sep_id)], axis=1).astype(
        np.int64
    )


def quantize_qdq(
    fp32_path: Path, qdq_path: Path, windows: np.ndarray, keep_fp32: list[str] | None = None
) -> None:
    """Static QDQ INT8, calibrated on `windows` (calibration_windows). Symmetric activations:
    TensorRT's INT8 takes no zero points. Nodes inside the attention's If branches stay in FP32
    (the quantizer does not enter subgraphs): the projections and FFNs, most of the FLOPs at
    these lengths, are INT8."""
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    graph_inputs = {i.name for i in graph.input}
    with _quiet():
        quantize_static(
            str(fp32_path),
            str(qdq_path),
            _Windows(windows, VERIFY_INPUT in graph_inputs),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm", "Gather"],
            nodes_to_exclude=[*(keep_fp32 or []), *_activation_gathers(graph)],
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibPercentile": 99.999},
        )


def _activation_gathers(graph: onnx.GraphProto) -> list[str]:
    """Every Gather but the embedding tables': the padding-free encoder's packing of activations
    (models/bert.Packing), data movement that INT8 would only add error to, and the graph's
    integer shape lookups, which no quantizer touches anyway."""
    weights = {initializer.name for initializer in graph.initializer}
    return [node.name for node in graph.node if node.op_type == "Gather" and node.input[0] not in weights]


def ffn_down_projections(fp32_path: Path) -> list[str]:
    """Each layer's FFN output projection: the usual INT8-sensitive spots in BERT (their input
    follows the GELU, with rare large activations)."""
    return _projections_of(fp32_path, "/dense_1")


def ffn_projections(fp32_path: Path) -> list[str]:
    """Both FFN projections of every layer, down-projections first: a static graph's candidates."""
    up = [name for name in _projections_of(fp32_path, "/dense") if "/attention/" not in name]
    return ffn_down_projections(fp32_path) + up


def _projections_of(fp32_path: Path, module: str) -> list[str]:
    """The nodes of the linear layers whose module path ends with `module`: a Gemm on packed
    [tokens, hidden] rows (models/bert.Packing), a MatMul on [batch, seq, hidden] in older exports."""
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    return [
        node.name
        for node in graph.node
        if node.op_type in ("MatMul", "Gemm") and node.name.endswith(f"{module}/{node.op_type}")
    ]


@dataclass(frozen=True)
class SensitivityResult:
    keep_fp32: list[str]
    score: float
    trials: dict[str, float]


Quantizer = Callable[[Path, Path, list[str]], None]  # (fp32, out, nodes kept in FP32)


def quantize_with_sensitivity(
    fp32_path: Path,
    int8_path: Path,
    score: Callable[[Path], float],
    candidates: list[str],
    target: float,
    quantize: Quantizer | None = None,
) -> SensitivityResult:
    """Quantize everything; if `score` (on dev data) misses `target`, keep in FP32 the candidate
    layers whose FP32 precision helps most, one at a time, until it holds. `quantize`: the
    scheme (default: per-channel dynamic INT8)."""
    apply: Quantizer = quantize or quantize_int8
    apply(fp32_path, int8_path, [])
    baseline = score(int8_path)
    trials = {"all int8": baseline}
    if baseline >= target:
        return SensitivityResult([], baseline, trials)
    with tempfile.TemporaryDirectory() as tmp:
        trial_path = Path(tmp) / "trial.onnx"
        for node in candidates:
            apply(fp32_path, trial_path, [node])
            trials[node] = score(trial_path)
    ranked = sorted(candidates, key=lambda node: trials[node], reverse=True)
    kept: list[str] = []
    best = baseline
    for node in ranked:
        kept.append(node)
        apply(fp32_path, int8_path, kept)
        best = score(int8_path)
        trials[" + ".join(kept)] = best
        if best >= target:
            break
    return SensitivityResult(kept, best, trials)
