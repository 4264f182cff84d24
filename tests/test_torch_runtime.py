"""The torch runtime (engine/runtime/torch_cuda.py) as far as a CPU allows: the same model as the
exported ONNX graph (fused dense attention and the eager blocked branch against the graph's
plain matmuls and scripted branches), its sparsity and kept-mass outputs, its reduced-precision
path (BF16 autocast on the CPU: the mixed FP32-mask/low-precision arithmetic CUDA's FP16 takes),
and its choice of captured shapes. CUDA graphs themselves need a GPU (tests/test_gpu.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.bundle import AttentionSpec
from engine.runtime.onnx import OnnxEncoderRuntime
from engine.runtime.torch_cuda import TorchEncoderRuntime, TorchOptions, graph_shape, length_buckets
from models.bert import AttentionPattern, BertEncoder, save_encoder_weights
from models.export import export_onnx
from tests.tiny_bert import tiny_bert_config
from tests.vectors import row_cosines

TINY = tiny_bert_config(vocab_size=200)
ATTENTION = AttentionSpec("local+global", window=8, global_tokens=3, dense_up_to=24)
CPU_FP32 = TorchOptions("cpu", "float32", cuda_graphs=False)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(torch weights, the FP32 ONNX graph of the same FP16-rounded weights)."""
    root = tmp_path_factory.mktemp("torch-runtime")
    torch.manual_seed(0)
    pattern = AttentionPattern(ATTENTION.window, ATTENTION.global_tokens, ATTENTION.dense_up_to)
    model = BertEncoder(TINY, pattern)
    for parameter in model.parameters():  # random weights, not the near-uniform default init
        torch.nn.init.normal_(parameter, std=0.3)
    save_encoder_weights(model, root / "encoder.torch.safetensors")
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    export_onnx(model.eval(), root / "encoder.fp32.onnx")
    return root / "encoder.torch.safetensors", root / "encoder.fp32.onnx"


def _batch(lengths: list[int], seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), max(lengths)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(1, TINY.vocab_size, length)
        mask[row, :length] = 1
    return ids, mask


@pytest.mark.parametrize(
    "lengths", [[20, 7, 13], [90, 31, 64]], ids=["dense branch (fused attention)", "blocked branch"]
)
def test_the_torch_runtime_computes_what_the_onnx_graph_does(
    weights: tuple[Path, Path], lengths: list[int]
) -> None:
    ids, mask = _batch(lengths)
    reference = OnnxEncoderRuntime(weights[1]).encode(ids, mask, verify=True)
    served = TorchEncoderRuntime(weights[0], ATTENTION, CPU_FP32).encode(ids, mask, verify=True)
    real = mask.astype(bool)
    assert np.abs(served.states[real] - reference.states[real]).max() < 1e-4
    assert served.sparsity is not None and reference.sparsity is not None
    np.testing.assert_allclose(served.sparsity, reference.sparsity, atol=1e-5)
    assert served.kept_attention_mass is not None and reference.kept_attention_mass is not None
    np.testing.assert_allclose(served.kept_attention_mass, reference.kept_attention_mass, atol=1e-5)
    if max(lengths) > (ATTENTION.dense_limit or 0):  # the blocked branch really ran: sparse, and measured
        assert (served.sparsity[[0, 2]] > 0.2).all() and (served.kept_attention_mass < 1.0).all()


def test_kept_mass_only_when_asked(weights: tuple[Path, Path]) -> None:
    ids, mask = _batch([90, 40])
    output = TorchEncoderRuntime(weights[0], ATTENTION, CPU_FP32).encode(ids, mask)
    assert output.kept_attention_mass is None and output.sparsity is not None


def test_reduced_precision_stays_close_to_fp32(weights: tuple[Path, Path]) -> None:
    """BF16 autocast through both branches (the CPU's stand-in for CUDA's FP16: FP32 masks and
    counts meeting low-precision activations, which a cast model would get wrong)."""
    ids, mask = _batch([90, 17, 64])
    fp32 = TorchEncoderRuntime(weights[0], ATTENTION, CPU_FP32).encode(ids, mask, verify=True)
    bf16 = TorchEncoderRuntime(weights[0], ATTENTION, TorchOptions("cpu", "bfloat16", False)).encode(
        ids, mask, verify=True
    )
    assert bf16.states.dtype == np.float32
    real = mask.astype(bool)
    a, b = fp32.states[real], bf16.states[real]
    cosine = row_cosines(a, b)
    assert cosine.min() > 0.99
    assert fp32.sparsity is not None and bf16.sparsity is not None
    np.testing.assert_allclose(bf16.sparsity, fp32.sparsity, atol=1e-6)  # counted in FP32 either way


def test_padding_a_batch_up_to_a_captured_shape_changes_no_real_token(weights: tuple[Path, Path]) -> None:
    """What a CUDA graph replay does to a batch (more rows, longer rows), done eagerly here."""
    runtime = TorchEncoderRuntime(weights[0], ATTENTION, CPU_FP32)
    for lengths in ([20, 7], [90, 31]):
        ids, mask = _batch(lengths)
        size, length = graph_shape(len(lengths), max(lengths), frozenset({(4, 24), (4, 128), (8, 128)})) or (
            0,
            0,
        )
        padded_ids = np.zeros((size, length), dtype=np.int64)
        padded_mask = np.zeros_like(padded_ids)
        padded_ids[: ids.shape[0], : ids.shape[1]] = ids
        padded_mask[: ids.shape[0], : ids.shape[1]] = mask
        padded_mask[ids.shape[0] :, 0] = 1
        alone = runtime.encode(ids, mask).states
        padded = runtime.encode(padded_ids, padded_mask).states[: ids.shape[0], : ids.shape[1]]
        real = mask.astype(bool)
        assert np.abs(alone[real] - padded[real]).max() < 1e-4


def test_captured_shapes_keep_the_dense_limit_and_fit_the_smallest() -> None:
    assert length_buckets(512, 384) == (16, 32, 64, 128, 256, 384, 512)
    assert length_buckets(128, 24) == (16, 24, 32, 64, 128)  # a batch of <= 24 is never padded past 24
    assert length_buckets(512, None) == (16, 32, 64, 128, 256, 384, 512)
    shapes = frozenset({(1, 16), (8, 16), (8, 128), (32, 128), (1, 512)})
    assert graph_shape(1, 10, shapes) == (1, 16)
    assert graph_shape(5, 16, shapes) == (8, 16)
    assert graph_shape(9, 100, shapes) == (32, 128)
    assert graph_shape(2, 300, shapes) is None  # runs eagerly


def _cuda_or_skip() -> None:
    if not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} sees no CUDA device: CUDA graphs need a GPU host")


@pytest.mark.gpu
def test_cuda_graph_replays_match_eager_and_the_cpu_reference(weights: tuple[Path, Path]) -> None:
    _cuda_or_skip()
    options = TorchOptions("cuda", "float16", cuda_graphs=True, max_graph_tokens=4096)
    runtime = TorchEncoderRuntime(weights[0], ATTENTION, options)
    assert runtime.captured_shapes, "no CUDA graph was captured"
    cpu = TorchEncoderRuntime(weights[0], ATTENTION, CPU_FP32)
    for lengths in ([20, 7, 13], [90, 31, 64], [5]):
        ids, mask = _batch(lengths)
        assert graph_shape(len(lengths), max(lengths), runtime.captured_shapes) is not None
        replayed = runtime.encode(ids, mask)  # a graph replay
        eager = runtime.encode(ids, mask, verify=True)  # verification runs eagerly
        reference = cpu.encode(ids, mask)
        real = mask.astype(bool)
        assert np.abs(replayed.states[real] - eager.states[real]).max() < 1e-2
        a, b = replayed.states[real], reference.states[real]
        cosine = row_cosines(a, b)
        assert cosine.min() > 0.99
        assert replayed.sparsity is not None and reference.sparsity is not None
        np.testing.assert_allclose(replayed.sparsity, reference.sparsity, atol=1e-5)


def test_the_weights_file_is_readable_by_the_serving_user(weights: tuple[Path, Path]) -> None:
    assert weights[0].stat().st_mode & 0o044 == 0o044  # safetensors alone writes 0600
