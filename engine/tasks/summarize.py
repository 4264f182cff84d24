"""Extractive summarization: score every sentence in its document's context, then select.

A sentence's features are the mean of its tokens' encoder states, the document's mean state and
where it sits (relative position, length). The head (trained on ACLSum's highlighted sentences)
gives the probability that a sentence belongs in a summary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from engine.tasks.heads import LabelledHead, softmax

POSITION_FEATURES = 3
_WORDS = re.compile(r"\w+")


def sentence_features(token_states: np.ndarray, token_sentence: np.ndarray, sentences: int) -> np.ndarray:
    """[sentences, 2 * hidden + 3]; `token_sentence[i]` is token i's sentence (-1: none).
    A sentence without tokens (only whitespace or symbols the tokenizer drops) gets zeros."""
    hidden = token_states.shape[1]
    sums = np.zeros((sentences, hidden), dtype=np.float32)
    counts = np.zeros(sentences, dtype=np.float32)
    inside = token_sentence >= 0
    np.add.at(sums, token_sentence[inside], token_states[inside])
    np.add.at(counts, token_sentence[inside], 1.0)
    means = sums / np.maximum(counts, 1.0)[:, None]
    document = np.broadcast_to(token_states.mean(axis=0), (sentences, hidden))
    position = np.arange(sentences, dtype=np.float32) / max(sentences - 1, 1)
    length = np.log1p(counts) / 5.0
    extra = np.stack([position, position**2, length], axis=1)
    return np.concatenate([means, document, extra], axis=1).astype(np.float32)


@dataclass(frozen=True, slots=True)
class SentenceScore:
    index: int
    start: int
    end: int
    score: float


@dataclass(frozen=True, slots=True)
class Selection:
    sentences: int | None = 3  # how many (None: by ratio)
    ratio: float | None = None  # share of the document's sentences, when `sentences` is None
    max_chars: int | None = None  # the summary's total length at most
    diversity: float = (
        0.8  # a sentence whose word overlap (Jaccard) with a chosen one is above this is skipped
    )
    keep_order: bool = True  # document order (else best first)


class SentenceScorer(LabelledHead):
    def scores(self, features: np.ndarray) -> np.ndarray:
        """Probability of the "summary" label for each sentence."""
        return softmax(self.head.logits(features))[:, self.labels.index("summary")]


def select(text: str, scored: list[SentenceScore], selection: Selection) -> list[SentenceScore]:
    """Best first, skipping near-duplicates and what would overrun `max_chars`; then ordered."""
    wanted = selection.sentences
    if wanted is None:
        wanted = max(1, round(len(scored) * (selection.ratio or 0.0)))
    chosen: list[SentenceScore] = []
    chosen_words: list[set[str]] = []
    used = 0
    for candidate in sorted(scored, key=lambda s: (-s.score, s.index)):
        if len(chosen) == wanted:
            break
        words = set(_WORDS.findall(text[candidate.start : candidate.end].lower()))
        if any(_jaccard(words, other) > selection.diversity for other in chosen_words):
            continue
        length = candidate.end - candidate.start
        if selection.max_chars is not None and used + length > selection.max_chars:
            continue
        chosen.append(candidate)
        chosen_words.append(words)
        used += length
    return sorted(chosen, key=lambda s: s.index) if selection.keep_order else chosen


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(len(a | b), 1)
