"""Documents longer than one encoder pass: truncation and overlapping windows on token boundaries.

A document is tokenized once, without special tokens; each window is a slice of its tokens with
[CLS] and [SEP] around it, so a window is an ordinary encoder input (batched, cached and
coalesced like any other) whose offsets index the original text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from engine.tokenization import DocumentTokens, TokenizedText

Strategy = Literal["truncate", "chunk"]
Side = Literal["right", "left"]
SPECIAL_TOKENS = 2  # [CLS] ... [SEP]
# Measured on this CPU (INT8 MiniLM, ONNX Runtime, 2 threads; `sparsebert bench --suite documents`):
# 16.4k tokens/s at 128-token inputs, 13.9k at 256, 6.5k at 512. Per token of text, 256-token
# windows overlapping by 32 cost the same as 128-token ones (12k new tokens/s) with twice the
# context each token sees, and 512-token windows cost twice as much.
DEFAULT_WINDOW = 256
DEFAULT_OVERLAP = 32


@dataclass(frozen=True, slots=True)
class LongInputPolicy:
    """How an input longer than `window` tokens (special tokens included) is handled."""

    strategy: Strategy
    window: int
    stride: int  # text tokens between the starts of consecutive windows (chunk)
    side: Side = "right"  # the end truncation cuts: "right" drops the end, "left" the start

    def __post_init__(self) -> None:
        if self.window <= SPECIAL_TOKENS:
            raise ValueError(f"a window must hold more than {SPECIAL_TOKENS} tokens")
        if not 0 < self.stride <= self.window - SPECIAL_TOKENS:
            raise ValueError(
                f"stride must be between 1 and the window's {self.window - SPECIAL_TOKENS} text tokens"
            )

    @classmethod
    def default_stride(cls, window: int) -> int:
        return max(window - SPECIAL_TOKENS - min(DEFAULT_OVERLAP, window // 4), 1)


@dataclass(frozen=True, slots=True)
class Window:
    start: int  # index of its first text token in the document
    end: int  # one past its last
    tokens: TokenizedText  # [CLS] + document tokens [start, end) + [SEP]


@dataclass(frozen=True, slots=True)
class WindowedDocument:
    document: DocumentTokens  # the tokens read (truncation: those kept), every one in a window
    windows: list[Window]
    dropped_tokens: int  # text tokens no window covers (truncation)

    @property
    def encoded_tokens(self) -> int:
        return sum(window.tokens.length for window in self.windows)


def window_spans(length: int, size: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) of overlapping windows of `size` tokens covering `length` tokens; the last
    window ends at the end (it overlaps its neighbour more rather than being short)."""
    if length <= size:
        return [(0, length)]
    spans = [(start, start + size) for start in range(0, length - size + 1, stride)]
    if spans[-1][1] < length:
        spans.append((length - size, length))
    return spans


def split(document: DocumentTokens, policy: LongInputPolicy, cls_id: int, sep_id: int) -> WindowedDocument:
    size = policy.window - SPECIAL_TOKENS
    if policy.strategy == "chunk":
        spans = window_spans(document.length, size, policy.stride)
        dropped = 0
    else:
        # The document becomes the part kept: every token of it is read, and its offsets still
        # index the original text.
        kept = min(document.length, size)
        first = 0 if policy.side == "right" else document.length - kept
        dropped = document.length - kept
        document = DocumentTokens(
            document.ids[first : first + kept],
            document.offsets[first : first + kept],
            document.word_ids[first : first + kept],
        )
        spans = [(0, kept)]
    windows = [
        Window(start, end, _window_tokens(document, start, end, cls_id, sep_id)) for start, end in spans
    ]
    return WindowedDocument(document, windows, dropped)


def _window_tokens(document: DocumentTokens, start: int, end: int, cls_id: int, sep_id: int) -> TokenizedText:
    ids = np.concatenate(([cls_id], document.ids[start:end], [sep_id])).astype(np.int64)
    return TokenizedText(
        ids=ids,
        offsets=((0, 0), *document.offsets[start:end], (0, 0)),
        word_ids=(None, *document.word_ids[start:end], None),
        dropped_tokens=0,
    )


def owner_windows(windows: list[Window], length: int) -> np.ndarray:
    """For each document token, the window in which it sits farthest from an edge (its states
    there saw the most context on both sides)."""
    owner = np.zeros(length, dtype=np.int64)
    margin = np.full(length, -1, dtype=np.int64)
    positions = np.arange(length)
    for index, window in enumerate(windows):
        inside = positions[window.start : window.end]
        distance = np.minimum(inside - window.start, window.end - 1 - inside)
        better = distance > margin[window.start : window.end]
        owner[window.start : window.end][better] = index
        margin[window.start : window.end][better] = distance[better]
    return owner


def document_states(windows: list[Window], states: list[np.ndarray], owner: np.ndarray) -> np.ndarray:
    """[document tokens, hidden] states, each token's from its owner window (`owner_windows`;
    the windows' states include their [CLS] and [SEP] rows)."""
    out = np.empty((owner.shape[0], states[0].shape[1]), dtype=np.float32)
    for index, window in enumerate(windows):
        rows = np.nonzero(owner[window.start : window.end] == index)[0]
        out[window.start + rows] = states[index][1 + rows]
    return out


def document_as_input(document: DocumentTokens) -> TokenizedText:
    """The whole document as one token sequence (no special tokens), for token-level heads."""
    return TokenizedText(document.ids, document.offsets, document.word_ids, dropped_tokens=0)


def window_borders(owner: np.ndarray) -> frozenset[int]:
    """Tokens whose owner window (`owner_windows`) differs from the previous token's."""
    return frozenset((np.nonzero(owner[1:] != owner[:-1])[0] + 1).tolist())
