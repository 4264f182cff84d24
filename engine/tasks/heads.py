"""Small MLP heads on encoder states, stored as .npz and evaluated in numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class MlpHead:
    """weight_0, bias_0, ..., weight_k, bias_k; ReLU between layers; returns logits."""

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray]]) -> None:
        if not layers:
            raise ValueError("a head needs at least one layer")
        self.layers = layers

    @classmethod
    def load(cls, path: Path) -> MlpHead:
        with np.load(path) as arrays:
            count = sum(1 for key in arrays.files if key.startswith("weight_"))
            layers = [
                (arrays[f"weight_{i}"].astype(np.float32), arrays[f"bias_{i}"].astype(np.float32))
                for i in range(count)
            ]
        return cls(layers)

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {}
        for i, (weight, bias) in enumerate(self.layers):
            arrays[f"weight_{i}"] = weight
            arrays[f"bias_{i}"] = bias
        np.savez(path, **arrays)  # type: ignore[arg-type]

    @property
    def num_labels(self) -> int:
        return int(self.layers[-1][0].shape[1])

    def logits(self, features: np.ndarray) -> np.ndarray:
        hidden = features
        last = len(self.layers) - 1
        for i, (weight, bias) in enumerate(self.layers):
            hidden = hidden @ weight + bias
            if i < last:
                hidden = np.maximum(hidden, 0.0)
        return hidden


class LabelledHead:
    """A head whose outputs are named by `labels`."""

    def __init__(self, head: MlpHead, labels: tuple[str, ...]) -> None:
        if head.num_labels != len(labels):
            raise ValueError(f"head has {head.num_labels} outputs for {len(labels)} labels")
        self.head = head
        self.labels = labels


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def mean_pool(states: np.ndarray) -> np.ndarray:
    """[tokens, hidden] states of one text (no padding) -> [hidden]."""
    return states.mean(axis=0)


def masked_mean(states: np.ndarray, lengths: list[int]) -> np.ndarray:
    """[batch, max_len, hidden] padded states -> [batch, hidden], each row the mean of its own
    tokens (the first `lengths[i]`): one batched pass instead of one call per input."""
    counts = np.asarray(lengths, dtype=states.dtype)[:, None]  # the states' dtype: float32 heads
    mask = np.arange(states.shape[1])[None, :] < counts
    return np.einsum("bth,bt->bh", states, mask.astype(states.dtype)) / counts
