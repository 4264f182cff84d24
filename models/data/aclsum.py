"""ACLSum (the `aclsum` package): papers' abstract, introduction and conclusion as sentences,
with the sentences annotators highlighted for three aspects and a reference summary per aspect."""

from __future__ import annotations

import json
from dataclasses import dataclass

from models.data.packages import aclsum_dir

SECTIONS = ("abstract", "introduction", "conclusion")
ASPECTS = ("challenge", "approach", "outcome")


@dataclass(frozen=True)
class Paper:
    id: str
    text: str  # the sentences joined by single spaces
    spans: tuple[tuple[int, int], ...]  # character span of each sentence in `text`
    highlighted: tuple[bool, ...]  # a sentence highlighted for any aspect
    reference: str  # the three aspects' summaries

    @property
    def sentences(self) -> list[str]:
        return [self.text[start:end] for start, end in self.spans]


def load_split(split: str) -> list[Paper]:
    """`train` (99 papers), `val` (49) or `test` (99)."""
    papers = []
    for line in (aclsum_dir() / f"{split}.jsonl").read_text().splitlines():
        raw = json.loads(line)
        sentences = [s for section in SECTIONS for s in raw["sentences"][section]]
        labels = [
            any(raw["highlights"][aspect][section][i] for aspect in ASPECTS)
            for section in SECTIONS
            for i in range(len(raw["sentences"][section]))
        ]
        spans, position = [], 0
        for sentence in sentences:
            spans.append((position, position + len(sentence)))
            position += len(sentence) + 1
        papers.append(
            Paper(raw["id"], " ".join(sentences), tuple(spans), tuple(labels),
                  " ".join(raw["summary"][aspect] for aspect in ASPECTS))
        )  # fmt: skip
    return papers
