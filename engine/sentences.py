"""Sentence boundaries with character offsets (pysbd: rule-based, handles abbreviations,
decimals, initials and quotes), and the tokens each sentence covers."""

from __future__ import annotations

import re
import threading

import numpy as np
import pysbd

_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_local = threading.local()  # a pysbd Segmenter keeps per-call state: one per thread


def _segmenter() -> pysbd.Segmenter:
    segmenter = getattr(_local, "segmenter", None)
    if segmenter is None:
        segmenter = _local.segmenter = pysbd.Segmenter(language="en", clean=False, char_span=True)
    return segmenter


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) of each sentence, surrounding whitespace excluded; paragraphs (blank lines)
    always end a sentence, as a headline has no full stop."""
    spans = []
    for paragraph_start, paragraph_end in _paragraphs(text):
        paragraph = text[paragraph_start:paragraph_end]
        for piece in _segmenter().segment(paragraph):
            start, end = piece.start, piece.end
            while start < end and paragraph[start].isspace():
                start += 1
            while end > start and paragraph[end - 1].isspace():
                end -= 1
            if end > start:
                spans.append((paragraph_start + start, paragraph_start + end))
    return spans


def _paragraphs(text: str) -> list[tuple[int, int]]:
    """Spans between blank lines."""
    spans, start = [], 0
    for gap in _BLANK_LINES.finditer(text):
        spans.append((start, gap.start()))
        start = gap.end()
    spans.append((start, len(text)))
    return [(s, e) for s, e in spans if text[s:e].strip()]


def token_sentences(offsets: tuple[tuple[int, int], ...], spans: list[tuple[int, int]]) -> np.ndarray:
    """For each token, the index of the sentence its first character lies in (-1: none)."""
    if not spans:
        return np.full(len(offsets), -1, dtype=np.int64)
    starts = np.array([start for start, _ in spans])
    ends = np.array([end for _, end in spans])
    token_starts = np.array([start for start, _ in offsets], dtype=np.int64)
    index = np.searchsorted(starts, token_starts, side="right") - 1
    inside = (index >= 0) & (token_starts < ends[np.clip(index, 0, None)])
    return np.where(inside, index, -1)
