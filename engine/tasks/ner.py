"""Token classification (NER) with the Hugging Face pipeline's aggregation strategies.

Offsets always index the caller's text, and `word` is the slice of the text it names (not a
re-decoded, lower-cased token string as the HF pipeline returns for uncased models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from engine.tasks.bio import constrained_tags, transition_scores
from engine.tasks.heads import LabelledHead, MlpHead, softmax
from engine.tokenization import TokenizedText

Aggregation = Literal["none", "simple", "first", "average", "max"]
AGGREGATIONS: tuple[Aggregation, ...] = ("none", "simple", "first", "average", "max")


@dataclass(frozen=True, slots=True)
class Entity:
    label: str  # "B-PER" per token with aggregation "none", else the group "PER"
    score: float
    word: str
    start: int
    end: int
    index: int | None = None  # token index, for aggregation "none"


@dataclass(slots=True)
class _Piece:
    label: str
    score: float
    start: int
    end: int
    border: bool = False  # its labels come from another window than the previous piece's


def _split_tag(label: str) -> tuple[str, str]:
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


class TokenClassifier(LabelledHead):
    """Aggregations other than "none" (the raw per-token output) decode the best well-formed
    BIO sequence over their pieces (engine/tasks/bio.py), not each piece's argmax alone."""

    def __init__(self, head: MlpHead, labels: tuple[str, ...]) -> None:
        super().__init__(head, labels)
        self._start, self._transitions = transition_scores(labels)

    def token_probs(self, states: np.ndarray) -> np.ndarray:
        return softmax(self.head.logits(states))

    def entities(
        self,
        text: str,
        tokens: TokenizedText,
        states: np.ndarray,
        aggregation: Aggregation,
        borders: frozenset[int] = frozenset(),
    ) -> list[Entity]:
        """`borders`: tokens whose states come from another window than the token before (a long
        document read in windows). A B- tag there continues an entity of the same type: each
        window alone may see only part of a name that straddles the border."""
        probs = self.token_probs(states)
        real = [i for i, word in enumerate(tokens.word_ids) if word is not None]
        if aggregation == "none":
            out = []
            for i in real:
                best = int(probs[i].argmax())
                if self.labels[best] != "O":
                    start, end = tokens.offsets[i]
                    out.append(
                        Entity(self.labels[best], float(probs[i, best]), text[start:end], start, end, i)
                    )
            return out
        if aggregation == "simple":
            units = [(probs[i], tokens.offsets[i], i in borders) for i in real]
        else:
            units = self._words(probs, tokens, real, aggregation, borders)
        if not units:
            return []
        vectors = np.stack([vector for vector, _, _ in units])
        chosen = constrained_tags(np.log(vectors + 1e-12), self._start, self._transitions)
        pieces = [
            _Piece(self.labels[label], float(vector[label]), span[0], span[1], border)
            for label, (vector, span, border) in zip(chosen, units, strict=True)
        ]
        return self._group(text, pieces)

    def _words(
        self,
        probs: np.ndarray,
        tokens: TokenizedText,
        real: list[int],
        aggregation: Aggregation,
        borders: frozenset[int],
    ) -> list[tuple[np.ndarray, tuple[int, int], bool]]:
        """Each word's label distribution, character span and whether it sits on a window border."""
        words: dict[int, list[int]] = {}
        for i in real:
            words.setdefault(tokens.word_ids[i], []).append(i)  # type: ignore[arg-type]
        units = []
        for members in words.values():
            span = (tokens.offsets[members[0]][0], tokens.offsets[members[-1]][1])
            border = any(i in borders for i in members)
            if aggregation == "first":
                vector = probs[members[0]]
            elif aggregation == "max":
                vector = probs[max(members, key=lambda i: float(probs[i].max()))]
            else:
                vector = probs[members].mean(axis=0)
            units.append((vector, span, border))
        return units

    @staticmethod
    def _group(text: str, pieces: list[_Piece]) -> list[Entity]:
        groups: list[list[_Piece]] = []
        for piece in pieces:
            if groups:
                _last_bi, last_tag = _split_tag(groups[-1][-1].label)
                bi, tag = _split_tag(piece.label)
                if tag == last_tag and (bi != "B" or piece.border):
                    groups[-1].append(piece)
                    continue
            groups.append([piece])
        out = []
        for group in groups:
            _, tag = _split_tag(group[0].label)
            if tag == "O":
                continue
            start, end = group[0].start, group[-1].end
            score = float(np.mean([piece.score for piece in group]))
            out.append(Entity(tag, score, text[start:end], start, end))
        return out
