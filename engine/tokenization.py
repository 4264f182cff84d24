"""Tokenization with Hugging Face `tokenizers`: ids, character offsets and word ids per text; ids
alone, where that is all a task needs, through `engine.fast_wordpiece` where it applies."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from engine.fast_wordpiece import FastWordPiece

# flash-tokenizer holds the GIL while it tokenizes, HF `tokenizers` releases it (measured here:
# a pure-Python thread ran at half speed beside flash-tokenizer reading a 20,000-character text
# in a loop, at full speed beside HF). Wherever the fast path runs, then, it blocks the event
# loop, ~30 ns a character and ~4 us a text: it reads texts of up to this many characters (one
# such text ~120 us; 64 short texts holding 2,880, ~250 us), HF the longer ones on the tokenizer
# thread, where they leave the loop free.
FAST_PATH_MAX_CHARS = 4096


@dataclass(frozen=True, slots=True)
class TokenizedText:
    """One text after tokenization: what the batcher and the task heads need of it."""

    ids: np.ndarray  # int64 [length], special tokens included
    # Both empty when tokenized for ids only (encode_ids_batch, encode_ids_inline):
    offsets: tuple[tuple[int, int], ...]  # character span of each token in the text
    word_ids: tuple[int | None, ...]  # word index of each token, None for special tokens
    dropped_tokens: int  # tokens removed by truncation

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True, slots=True)
class DocumentTokens:
    """Every token of a text, special tokens excluded."""

    ids: np.ndarray  # int64 [n]
    offsets: tuple[tuple[int, int], ...]
    word_ids: tuple[int | None, ...]

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


class TextTokenizer:
    """Wraps a `tokenizer.json`, with its fixed padding and truncation turned off.

    Packaged tokenizers often pad every text to a fixed length; served that way every request
    would cost the price of the longest. Truncation is done here so the dropped count is known.
    """

    def __init__(self, path: Path, max_length: int) -> None:
        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.max_length = max_length
        sep = self._tokenizer.token_to_id("[SEP]")
        if sep is None:
            raise ValueError(f"{path} has no [SEP] token")
        cls = self._tokenizer.token_to_id("[CLS]")
        if cls is None:
            raise ValueError(f"{path} has no [CLS] token")
        self.sep_id = sep
        self.cls_id = cls
        self.fast_ids = FastWordPiece.for_tokenizer_json(path)

    def encode_batch(self, texts: list[str]) -> list[TokenizedText]:
        return [self._truncate(encoding) for encoding in self._tokenizer.encode_batch(texts)]

    def _fast_path_reads(self, text: str) -> bool:
        fast = self.fast_ids
        return fast is not None and len(text) <= FAST_PATH_MAX_CHARS and fast.applies(text)

    def encode_ids_inline(self, texts: list[str]) -> list[TokenizedText] | None:
        """What `encode_ids_batch` gives, if the fast path reads every text and together they
        hold at most FAST_PATH_MAX_CHARS characters; else None. Such texts are cheap enough to
        tokenize on the event loop itself: a hop to the tokenizer thread would free nothing (the
        fast path holds the GIL) and costs more than the tokenization (measured at concurrency
        32 on the benchmark workload, three runs each: 299-312 req/s through the thread, 327-333
        in place; the tokenizer thread's CPU 0.043 -> 0.008 of a core, the loop's unchanged)."""
        fast = self.fast_ids
        # Under the total, each text is under the bound: only `applies` is left to ask.
        if fast is None or sum(map(len, texts)) > FAST_PATH_MAX_CHARS or not all(map(fast.applies, texts)):
            return None
        return [self._truncate_ids(fast.ids(text)) for text in texts]

    def encode_ids_batch(self, texts: list[str]) -> list[TokenizedText]:
        """The ids `encode_batch` gives, without offsets or word ids (left empty)."""
        fast = self.fast_ids
        if fast is None:
            return [replace(t, offsets=(), word_ids=()) for t in self.encode_batch(texts)]
        slow = [i for i, text in enumerate(texts) if not self._fast_path_reads(text)]
        by_hf = dict(zip(slow, self.encode_batch([texts[i] for i in slow]), strict=True))
        return [
            replace(by_hf[i], offsets=(), word_ids=()) if i in by_hf else self._truncate_ids(fast.ids(text))
            for i, text in enumerate(texts)
        ]

    def encode_words_batch(self, sentences: list[list[str]]) -> list[TokenizedText]:
        """Pre-split words (as in CoNLL data); offsets are then relative to each word."""
        encodings = self._tokenizer.encode_batch(sentences, is_pretokenized=True)
        return [self._truncate(encoding) for encoding in encodings]

    def encode_documents(self, texts: list[str]) -> list[DocumentTokens]:
        """Every token of each text, no special tokens and no truncation (for windowing)."""
        return [
            DocumentTokens(np.asarray(e.ids, dtype=np.int64), tuple(e.offsets), tuple(e.word_ids))
            for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)
        ]

    def _truncate_ids(self, ids: np.ndarray) -> TokenizedText:
        """The first max_length - 1 ids and [SEP], and how many were dropped; no offsets."""
        dropped = max(0, len(ids) - self.max_length)
        if dropped:
            ids = np.append(ids[: self.max_length - 1], np.int64(self.sep_id))
        return TokenizedText(ids=ids, offsets=(), word_ids=(), dropped_tokens=dropped)

    def _truncate(self, encoding: Encoding) -> TokenizedText:
        kept = self._truncate_ids(np.asarray(encoding.ids, dtype=np.int64))
        offsets = encoding.offsets
        word_ids = encoding.word_ids
        if kept.dropped_tokens:  # the offsets of the kept tokens, then the [SEP]'s
            offsets = [*offsets[: kept.length - 1], (0, 0)]
            word_ids = [*word_ids[: kept.length - 1], None]
        return TokenizedText(kept.ids, tuple(offsets), tuple(word_ids), kept.dropped_tokens)
