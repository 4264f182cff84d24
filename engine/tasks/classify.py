"""Sequence classification: mean-pooled encoder states -> head -> top-k labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.tasks.heads import MlpHead, mean_pool, softmax


@dataclass(frozen=True, slots=True)
class LabelScore:
    label: str
    score: float


class Classifier:
    def __init__(self, head: MlpHead, labels: tuple[str, ...]) -> None:
        if head.num_labels != len(labels):
            raise ValueError(f"head has {head.num_labels} outputs for {len(labels)} labels")
        self.head = head
        self.labels = labels

    def scores(self, states: np.ndarray) -> np.ndarray:
        return softmax(self.head.logits(mean_pool(states)[None, :]))[0]

    def raw_scores(self, states: np.ndarray) -> np.ndarray:
        return self.head.logits(mean_pool(states)[None, :])[0]

    def top_k(self, states: np.ndarray, k: int) -> list[LabelScore]:
        probs = self.scores(states)
        order = np.argsort(-probs)[:k]
        return [LabelScore(self.labels[i], float(probs[i])) for i in order]
