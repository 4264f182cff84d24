"""Aggregation strategies of token classification, on a head with known outputs."""

from __future__ import annotations

import numpy as np

from engine.tasks.heads import MlpHead
from engine.tasks.ner import TokenClassifier
from engine.tokenization import TokenizedText

LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


def classifier() -> TokenClassifier:
    # Identity head: each token's "state" is already its logits.
    return TokenClassifier(MlpHead([(np.eye(5, dtype=np.float32) * 10, np.zeros(5, np.float32))]), LABELS)


def onehot(*labels: str) -> np.ndarray:
    states = np.zeros((len(labels), 5), dtype=np.float32)
    for i, label in enumerate(labels):
        states[i, LABELS.index(label)] = 1.0
    return states


# "[CLS] jo ##hn lives in paris [SEP]" over "John lives in Paris"
TEXT = "John lives in Paris"
TOKENS = TokenizedText(
    ids=np.arange(7, dtype=np.int64),
    offsets=((0, 0), (0, 2), (2, 4), (5, 10), (11, 13), (14, 19), (0, 0)),
    word_ids=(None, 0, 0, 1, 2, 3, None),
    dropped_tokens=0,
)


def test_simple_groups_subwords_and_slices_the_text() -> None:
    states = onehot("O", "B-PER", "I-PER", "O", "O", "B-LOC", "O")
    entities = classifier().entities(TEXT, TOKENS, states, "simple")
    assert [(e.label, e.word, e.start, e.end) for e in entities] == [
        ("PER", "John", 0, 4),
        ("LOC", "Paris", 14, 19),
    ]


def test_none_returns_tagged_tokens_with_indices() -> None:
    states = onehot("O", "B-PER", "I-PER", "O", "O", "B-LOC", "O")
    entities = classifier().entities(TEXT, TOKENS, states, "none")
    assert [(e.label, e.word, e.index) for e in entities] == [
        ("B-PER", "Jo", 1),
        ("I-PER", "hn", 2),
        ("B-LOC", "Paris", 5),
    ]


def test_word_strategies_resolve_disagreeing_subwords() -> None:
    # First sub-word says PER, second (more confident) says LOC.
    states = onehot("O", "B-PER", "B-LOC", "O", "O", "O", "O")
    states[2] *= 3
    first = classifier().entities(TEXT, TOKENS, states, "first")
    strongest = classifier().entities(TEXT, TOKENS, states, "max")
    average = classifier().entities(TEXT, TOKENS, states, "average")
    assert [(e.label, e.word) for e in first] == [("PER", "John")]
    assert [(e.label, e.word) for e in strongest] == [("LOC", "John")]
    assert [(e.label, e.word) for e in average] == [("LOC", "John")]


def test_b_tag_starts_a_new_entity_of_the_same_type() -> None:
    states = onehot("O", "B-PER", "B-PER", "O", "O", "O", "O")
    entities = classifier().entities(TEXT, TOKENS, states, "simple")
    assert [e.word for e in entities] == ["Jo", "hn"]
