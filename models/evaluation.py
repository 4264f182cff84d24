"""Task metrics shared by the build's report card."""

from __future__ import annotations

import numpy as np
from seqeval.metrics import f1_score

from engine.tasks.bio import constrained_tags, transition_scores
from engine.tasks.heads import MlpHead, softmax
from engine.tokenization import TokenizedText


def accuracy(head: MlpHead, features: np.ndarray, labels: np.ndarray) -> float:
    return float((head.logits(features).argmax(axis=1) == labels).mean())


def word_predictions(
    head: MlpHead, tokens: list[TokenizedText], states: list[np.ndarray], labels: tuple[str, ...]
) -> list[list[str]]:
    """Each word's tag from its first sub-word token (aggregation "first"), the sentence's tags
    decoded as the best well-formed BIO sequence, as the server does (engine/tasks/bio.py)."""
    start, transitions = transition_scores(labels)
    out = []
    for tok, st in zip(tokens, states, strict=True):
        first: dict[int, int] = {}
        for i, word in enumerate(tok.word_ids):
            if word is not None and word not in first:
                first[word] = i
        rows = [first[word] for word in sorted(first)]
        log_probs = np.log(softmax(head.logits(st[rows])) + 1e-12)
        out.append([labels[int(i)] for i in constrained_tags(log_probs, start, transitions)])
    return out


def entity_f1(gold: list[list[str]], predicted: list[list[str]]) -> float:
    # Truncated sentences have fewer predicted words: count the missing ones as O.
    padded = [p + ["O"] * (len(g) - len(p)) for g, p in zip(gold, predicted, strict=True)]
    return float(f1_score(gold, padded))


def agreement(a: list[list[str]] | np.ndarray, b: list[list[str]] | np.ndarray) -> float:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return float((a == b).mean())
    flat_a = [x for row in a for x in row]
    flat_b = [x for row in b for x in row]
    return float(np.mean([x == y for x, y in zip(flat_a, flat_b, strict=True)]))
