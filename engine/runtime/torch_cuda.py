"""The torch runtime: the sparse-attention student of models/bert.py in FP16 or BF16 on a CUDA GPU.

Dense attention (a sparse pattern's dense branch included) runs in torch's fused
scaled_dot_product_attention; the blocked branch in the same ops as the exported graph. The
weights stay FP32 and autocast computes in the chosen type: the sparse branch mixes its FP32
masks and counts with the activations, and autocast keeps that exact where a cast model would
overflow FP16 (a 512-token sequence has 262,144 query-key pairs; FP16 ends at 65,504).

Each batch is padded up to a captured shape: one CUDA graph per (batch-size bucket, length
bucket), captured when the runtime is built (before the server is ready, never on a request),
sharing one memory pool. A replay is one launch instead of ~150 kernel launches, which is what
small batches on a GPU pay for. Inputs go up through pinned host memory on the runtime's own
stream, and come back the same way. The length buckets include the pattern's dense limit, so
padding never moves a batch from the dense branch to the blocked one. A batch bigger than every
captured shape, or one sampled for verification, runs eagerly.

On a CPU (device "cpu") it runs eagerly in FP32 (or BF16): the reference the tests compare with,
and the plain-torch baseline of the GPU benchmark. Only this runtime imports torch, on demand:
the ONNX Runtime paths never do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from engine.bundle import AttentionSpec
from engine.runtime.base import RuntimeOutput

if TYPE_CHECKING:
    import torch

TorchDtype = Literal["float16", "bfloat16", "float32"]
GRAPH_LENGTHS = (16, 32, 64, 128, 256, 384, 512)
GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class TorchOptions:
    device: str = "cuda"
    dtype: TorchDtype = "float16"
    cuda_graphs: bool = True
    max_graph_tokens: int = 32768  # the largest captured shape, in padded tokens


def length_buckets(max_length: int, dense_limit: int | None) -> tuple[int, ...]:
    """The captured lengths up to the model's maximum, with the sparse pattern's dense limit
    among them (so a batch read densely is never padded past it) and the maximum itself."""
    lengths = {length for length in GRAPH_LENGTHS if length < max_length} | {max_length}
    if dense_limit is not None and dense_limit < max_length:
        lengths.add(dense_limit)
    return tuple(sorted(lengths))


def graph_shape(size: int, length: int, shapes: frozenset[tuple[int, int]]) -> tuple[int, int] | None:
    """The smallest captured (batch size, length) that holds a batch, or None."""
    fitting = [shape for shape in shapes if shape[0] >= size and shape[1] >= length]
    if not fitting:
        return None
    return min(fitting, key=lambda shape: (shape[0] * shape[1], shape[1]))


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    states: torch.Tensor  # FP32, on the device
    sparsity: torch.Tensor
    host_states: torch.Tensor  # pinned, flat: a batch's rows are its first size x length x hidden


class TorchEncoderRuntime:
    def __init__(
        self,
        weights: Path,
        attention: AttentionSpec,
        options: TorchOptions,
        *,
        name: str = "torch",
    ) -> None:
        import torch

        from models.bert import AttentionPattern, load_encoder_weights

        self._torch = torch
        self.name = name
        self._device = torch.device(options.device)
        self._dtype = getattr(torch, options.dtype)
        pattern = (
            AttentionPattern(attention.window, attention.global_tokens, attention.dense_up_to)
            if attention.sparse
            else AttentionPattern()
        )
        self._sparse = attention.sparse
        # A captured CUDA graph has fixed shapes: no packing of the real tokens (models/bert.Packing).
        self._model = load_encoder_weights(
            weights, pattern, sdpa=True, drop_padding=not options.cuda_graphs
        ).to(self._device)
        self._no_verify = torch.tensor(False)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        on_gpu = self._device.type == "cuda"
        self._stream = torch.cuda.Stream(self._device) if on_gpu else None  # type: ignore[no-untyped-call]
        max_length = self._model.config.max_position_embeddings
        self.buckets = length_buckets(max_length, attention.dense_limit)
        if self._stream is not None and options.cuda_graphs:
            self._capture(options.max_graph_tokens)
        if on_gpu:
            torch.cuda.synchronize(self._device)  # weights and static inputs are in place for any stream
        self._shapes = frozenset(self._graphs)

    @property
    def captured_shapes(self) -> frozenset[tuple[int, int]]:
        return self._shapes

    def encode(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, verify: bool = False
    ) -> RuntimeOutput:
        size, length = input_ids.shape
        if not verify and self._shapes:
            shape = graph_shape(size, length, self._shapes)
            if shape is not None:
                return self._replay(self._graphs[shape], input_ids, attention_mask)
        return self._eager(input_ids, attention_mask, verify)

    @contextlib.contextmanager
    def _computing(self) -> Iterator[None]:
        torch = self._torch
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if self._stream is not None:
                stack.enter_context(torch.cuda.stream(self._stream))
            if self._dtype != torch.float32:
                # No weight-cast cache: a CUDA graph must not capture casts made outside it.
                stack.enter_context(torch.autocast(self._device.type, dtype=self._dtype, cache_enabled=False))
            yield

    def _forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, verify: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        states, sparsity, kept = self._model.encode_verified(input_ids, attention_mask, verify)
        return states.float(), sparsity.float(), kept.float()

    def _host(self, array: np.ndarray) -> torch.Tensor:
        """The array as a host tensor, pinned on a GPU machine (an asynchronous upload needs it)."""
        tensor = self._torch.from_numpy(np.ascontiguousarray(array))
        return tensor.pin_memory() if self._device.type == "cuda" else tensor

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        return self._host(array).to(self._device, non_blocking=True)

    def _eager(self, input_ids: np.ndarray, attention_mask: np.ndarray, verify: bool) -> RuntimeOutput:
        torch = self._torch
        with self._computing():
            states, sparsity, kept = self._forward(
                self._upload(input_ids), self._upload(attention_mask), torch.tensor(bool(verify))
            )
            host = [tensor.cpu().numpy() for tensor in (states, sparsity, kept)]
        return RuntimeOutput(
            host[0], host[1] if self._sparse else None, host[2] if verify and self._sparse else None
        )

    def _replay(self, graph: _Graph, input_ids: np.ndarray, attention_mask: np.ndarray) -> RuntimeOutput:
        size, length = input_ids.shape
        padded_ids = np.zeros(tuple(graph.input_ids.shape), dtype=np.int64)
        padded_mask = np.zeros_like(padded_ids)
        padded_ids[:size, :length] = input_ids
        padded_mask[:size, :length] = attention_mask
        padded_mask[size:, 0] = 1  # a padding row with no real key would be NaN in fused attention
        assert self._stream is not None
        with self._computing():
            # Straight into the graph's static inputs. The pinned sources are held until this call
            # has synchronized the stream, after the copies.
            host_ids, host_mask = self._host(padded_ids), self._host(padded_mask)
            graph.input_ids.copy_(host_ids, non_blocking=True)
            graph.attention_mask.copy_(host_mask, non_blocking=True)
            graph.graph.replay()
            hidden = graph.states.shape[2]
            host = graph.host_states[: size * length * hidden].view(size, length, hidden)
            host.copy_(graph.states[:size, :length], non_blocking=True)
            sparsity = graph.sparsity[:size].cpu().numpy()  # synchronizes the stream
        self._stream.synchronize()
        return RuntimeOutput(host.numpy().copy(), sparsity if self._sparse else None)

    def _capture(self, max_tokens: int) -> None:
        """One graph per shape, largest first (the shared pool then fits every later one)."""
        torch = self._torch
        shapes = sorted(
            (
                (size, length)
                for size in GRAPH_SIZES
                for length in self.buckets
                if size * length <= max_tokens
            ),
            key=lambda shape: -shape[0] * shape[1],
        )
        pool = torch.cuda.graph_pool_handle()
        hidden = self._model.config.hidden_size
        for size, length in shapes:
            input_ids = torch.full((size, length), 1000 % self._model.config.vocab_size, device=self._device)
            attention_mask = torch.ones((size, length), dtype=torch.int64, device=self._device)
            assert self._stream is not None
            self._stream.wait_stream(torch.cuda.current_stream(self._device))  # the inputs were made there
            with self._computing():
                for _ in range(2):  # kernel selection and workspaces happen before capture
                    self._forward(input_ids, attention_mask, self._no_verify)
            self._stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with self._computing(), torch.cuda.graph(graph, pool=pool, stream=self._stream):
                states, sparsity, _ = self._forward(input_ids, attention_mask, self._no_verify)
            host_states = torch.empty(size * length * hidden, dtype=torch.float32, pin_memory=True)
            self._graphs[(size, length)] = _Graph(
                graph, input_ids, attention_mask, states, sparsity, host_states
            )
