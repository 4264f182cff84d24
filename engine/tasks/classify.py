"""Sequence classification: mean-pooled encoder states -> head -> top-k labels."""

from __future__ import annotations

from dataclasses import dataclass

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
