"""Token ids without offsets, for the texts where `flash-tokenizer` gives exactly the ids Hugging
Face `tokenizers` gives, ~7x faster (14.7 vs 103 us a text on the benchmark workload here).

Classification and embeddings need only ids; HF `tokenizers` spends most of its time tracking
the alignment of every normalized character, which only offsets need. flash-tokenizer is a C++
BERT WordPiece tokenizer (ids only). It agrees with HF on ASCII text (checked here on 18,078
random ASCII texts that `applies` lets through, none differing, and by
`tests/test_fast_wordpiece.py` with hypothesis) except in these places, which
`FastWordPiece.applies` routes to HF instead:
- a word of more than `max_input_chars_per_word` characters: HF makes the whole word `[UNK]`,
  flash-tokenizer splits it;
- control characters other than tab, newline and carriage return: HF drops them first, so
  "ab\x1ccd" is one word to it (and, with more letters, one `[UNK]`), while `str.split` (which
  measures the words here) splits at some of them;
- an added token written out in the text (`[SEP]`, `[MASK]`, ...): HF reads it as that token.
Non-ASCII text always goes to HF: BERT's normalization of accents, CJK and control characters is
where two implementations are likeliest to differ.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

try:
    from flash_tokenizer._core import FlashBertTokenizer
except ImportError:  # an optional dependency: wheels for Linux x86_64 (and Windows) only
    FlashBertTokenizer = None

# Longer than any input the server takes: truncation is the caller's (it counts what it drops).
UNBOUNDED = 1 << 30
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class FastWordPiece:
    def __init__(self, tokenizer: Any, max_word_chars: int, added_tokens: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._max_word_chars = max_word_chars
        self._added_tokens = added_tokens

    @classmethod
    def for_tokenizer_json(cls, path: Path) -> FastWordPiece | None:
        """The fast path for a `tokenizer.json`, or None where flash-tokenizer is not installed or
        the tokenizer is not the uncased BERT WordPiece pipeline it implements."""
        if FlashBertTokenizer is None:
            return None
        config = json.loads(path.read_text(encoding="utf-8"))
        model, normalizer = config.get("model") or {}, config.get("normalizer") or {}
        template = [
            next(iter(part.values()))["id"] for part in (config.get("post_processor") or {}).get("single", [])
        ]
        if not (
            model.get("type") == "WordPiece"
            and model.get("continuing_subword_prefix") == "##"
            and model.get("unk_token") == "[UNK]"
            and normalizer.get("type") == "BertNormalizer"
            and normalizer.get("lowercase") is True
            and normalizer.get("clean_text") is True
            and (config.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer"
            and template == ["[CLS]", "A", "[SEP]"]
        ):
            return None
        vocab: dict[str, int] = model["vocab"]
        tokens = sorted(vocab, key=vocab.__getitem__)
        if [vocab[token] for token in tokens] != list(range(len(tokens))):
            return None  # flash-tokenizer numbers the vocabulary file's lines
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt") as vocab_file:
            vocab_file.write("\n".join(tokens) + "\n")
            vocab_file.flush()
            tokenizer = FlashBertTokenizer(vocab_file.name, True, UNBOUNDED, True)
        added = tuple(token["content"] for token in config.get("added_tokens", []))
        return cls(tokenizer, int(model["max_input_chars_per_word"]), added)

    def applies(self, text: str) -> bool:
        return (
            text.isascii()
            and CONTROL.search(text) is None
            and max(map(len, text.split()), default=0) <= self._max_word_chars
            and not any(token in text for token in self._added_tokens)
        )

    def ids(self, text: str) -> np.ndarray:
        """int64 ids, special tokens included, untruncated. Only for a text it `applies` to."""
        return np.asarray(self._tokenizer.encode(text, "longest", UNBOUNDED), dtype=np.int64)
