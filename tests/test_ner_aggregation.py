"""Aggregation strategies of token classification, on a head with known outputs."""

from __future__ import annotations

import itertools

import numpy as np

from engine.tasks.bio import constrained_tags, transition_scores
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


def test_ill_formed_tag_sequences_are_decoded_to_the_best_well_formed_one() -> None:
    # Each token alone: "Jo" O (barely), "hn" I-PER; "Paris" I-LOC after O. Argmax per token
    # would start entities with I- tags; the decoder picks B-PER I-PER and B-LOC instead.
    states = onehot("O", "O", "I-PER", "O", "O", "I-LOC", "O")
    states[1, LABELS.index("B-PER")] = 0.9
    states[5, LABELS.index("B-LOC")] = 0.5
    entities = classifier().entities(TEXT, TOKENS, states, "simple")
    assert [(e.label, e.word) for e in entities] == [("PER", "John"), ("LOC", "Paris")]
    # The score is the decoded tags' probability ("Jo" B-PER: 0.27), not the argmax's (O: 0.73).
    assert entities[0].score < 0.7
    # "none" is the raw per-token output, as in the HF contract.
    raw = classifier().entities(TEXT, TOKENS, states, "none")
    assert [e.label for e in raw] == ["I-PER", "I-LOC"]


def test_the_decoder_finds_the_best_well_formed_sequence() -> None:
    """Against brute force over every sequence, on random distributions."""
    start, transitions = transition_scores(LABELS)
    rng = np.random.default_rng(0)
    for _ in range(50):
        length = int(rng.integers(1, 6))
        log_probs = np.log(rng.dirichlet(np.ones(len(LABELS)) * 0.5, size=length))
        best, best_score = None, -np.inf
        for sequence in itertools.product(range(len(LABELS)), repeat=length):
            if not well_formed([LABELS[i] for i in sequence]):
                continue
            score = sum(log_probs[position, label] for position, label in enumerate(sequence))
            if score > best_score:
                best, best_score = sequence, score
        assert tuple(constrained_tags(log_probs, start, transitions)) == best


def well_formed(tags: list[str]) -> bool:
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            return False
        previous = tag
    return True
