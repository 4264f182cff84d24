"""Encoder states for training and evaluation, computed with the same ONNX Runtime as serving."""

from __future__ import annotations

import numpy as np

from engine.runtime.base import EncoderRuntime, pad_batch
from engine.tokenization import TokenizedText


def encode_all(
    runtime: EncoderRuntime, tokens: list[TokenizedText], max_batch_tokens: int = 4096
) -> list[np.ndarray]:
    """States [length, hidden] for each input, batched by sorted length to waste little padding."""
    order = sorted(range(len(tokens)), key=lambda i: tokens[i].length)
    out: list[np.ndarray] = [np.empty(0)] * len(tokens)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * tokens[order[end]].length <= max_batch_tokens:
            end += 1
        chunk = order[start:end]
        max_len = tokens[chunk[-1]].length
        ids, mask = pad_batch([tokens[i].ids for i in chunk], max_len)
        states = runtime.encode(ids, mask).states
        for row, i in enumerate(chunk):
            out[i] = states[row, : tokens[i].length].copy()
        start = end
    return out


def mean_pooled(states: list[np.ndarray]) -> np.ndarray:
    return np.stack([s.mean(axis=0) for s in states]).astype(np.float32)
