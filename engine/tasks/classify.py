"""Sequence classification: mean-pooled encoder states -> head -> top-k labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.tasks.heads import LabelledHead, softmax


@dataclass(frozen=True, slots=True)
class LabelScore:
    label: str
    score: float


class Classifier(LabelledHead):
    def top_k(
        self, pooled: np.ndarray, k: int, *, raw: bool = False, logits: np.ndarray | None = None
    ) -> list[LabelScore]:
        """The k best labels of a text's mean-pooled [hidden] states: probabilities, or logits if
        raw. `logits`: this head's output, when already computed with its batch."""
        if logits is None:
            logits = self.head.logits(pooled[None, :])[0]
        scores = logits if raw else softmax(logits)
        order = np.argsort(-scores)[:k]
        return [LabelScore(self.labels[i], float(scores[i])) for i in order]


class WindowAggregator:
    """Attention pooling over a document's windows, trained with the task's head: each window's
    mean-pooled states get a weight softmax(states . query + bias), and the document's vector is
    their weighted sum. Without trained weights, windows are averaged."""

    def __init__(self, query: np.ndarray | None = None, bias: float = 0.0) -> None:
        self.query = query
        self.bias = bias

    @classmethod
    def load(cls, path: Path) -> WindowAggregator:
        with np.load(path) as arrays:
            return cls(arrays["query"].astype(np.float32), float(arrays["bias"]))

    def save(self, path: Path) -> None:
        if self.query is None:
            raise ValueError("an untrained (averaging) aggregator has nothing to save")
        np.savez(path, query=self.query, bias=np.float32(self.bias))

    def weights(self, windows: np.ndarray) -> np.ndarray:
        """[windows, hidden] -> [windows] summing to 1."""
        if self.query is None:
            return np.full(windows.shape[0], 1.0 / windows.shape[0], dtype=np.float32)
        scores = windows @ self.query + self.bias
        return softmax(scores)

    def pool(self, windows: np.ndarray) -> np.ndarray:
        return self.weights(windows) @ windows
