"""Sequence classification: mean-pooled encoder states -> head -> top-k labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.tasks.heads import LabelledHead, mean_pool, softmax


@dataclass(frozen=True, slots=True)
class LabelScore:
    label: str
    score: float


class Classifier(LabelledHead):
    def top_k(self, states: np.ndarray, k: int, *, raw: bool = False) -> list[LabelScore]:
        """The k best labels of a text's [tokens, hidden] states: probabilities, or logits if raw."""
        logits = self.head.logits(mean_pool(states)[None, :])[0]
        scores = logits if raw else softmax(logits)
        order = np.argsort(-scores)[:k]
        return [LabelScore(self.labels[i], float(scores[i])) for i in order]
