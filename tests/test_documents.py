"""Windows on token boundaries, the window that owns each token, and sentence spans."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from engine.documents import LongInputPolicy, Side, document_states, owner_windows, split, window_spans
from engine.sentences import sentence_spans, token_sentences
from engine.tasks.heads import MlpHead
from engine.tasks.ner import TokenClassifier
from engine.tasks.summarize import Selection, SentenceScore, select
from engine.tokenization import TextTokenizer, TokenizedText


@pytest.fixture(scope="module")
def tokenizer(bundle_dir: Path) -> TextTokenizer:
    return TextTokenizer(bundle_dir / "tokenizer.json", 512)


@pytest.mark.parametrize(
    ("length", "size", "stride"), [(10, 4, 3), (1000, 254, 222), (254, 254, 222), (3, 254, 222)]
)
def test_windows_cover_every_token_with_the_asked_overlap(length: int, size: int, stride: int) -> None:
    spans = window_spans(length, size, stride)
    covered = np.zeros(length, dtype=int)
    for start, end in spans:
        assert end - start == min(size, length)
        covered[start:end] += 1
    assert covered.min() >= 1 and spans[0][0] == 0 and spans[-1][1] == length
    starts = [start for start, _ in spans]
    assert all(b - a <= stride for a, b in itertools.pairwise(starts))


def test_each_token_is_owned_by_the_window_where_it_sits_farthest_from_an_edge() -> None:
    spans = window_spans(20, 8, 6)  # [0, 8) [6, 14) [12, 20)
    policy_windows = split_windows(spans)
    owner = owner_windows(policy_windows, 20)
    assert owner.tolist()[:8] == [0] * 7 + [1]  # token 7: 0 from window 0's end, 1 into window 1
    assert owner[6] == 0 and owner[13] == 2 and owner[19] == 2


def split_windows(spans: list[tuple[int, int]]) -> list:  # type: ignore[type-arg]
    from engine.documents import Window
    from engine.tokenization import TokenizedText

    empty = TokenizedText(np.zeros(0, dtype=np.int64), (), (), 0)
    return [Window(start, end, empty) for start, end in spans]


def test_document_states_come_from_the_owner_windows_and_skip_special_tokens(
    tokenizer: TextTokenizer,
) -> None:
    [document] = tokenizer.encode_documents(["word " * 30])
    windowed = split(document, LongInputPolicy("chunk", 12, 7), tokenizer.cls_id, tokenizer.sep_id)
    # Each window's states: row r holds (window index, r), so the source of every row is visible.
    states = [
        np.array([[w, r] for r in range(win.tokens.length)], dtype=np.float32)
        for w, win in enumerate(windowed.windows)
    ]
    owner = owner_windows(windowed.windows, document.length)
    merged = document_states(windowed.windows, states, owner)
    for token in range(document.length):
        window = windowed.windows[owner[token]]
        assert merged[token].tolist() == [owner[token], token - window.start + 1]  # +1: [CLS] first


def test_truncation_keeps_the_asked_side_and_counts_what_it_dropped(tokenizer: TextTokenizer) -> None:
    text = "alpha " * 50 + "omega"
    [document] = tokenizer.encode_documents([text])
    sides: list[tuple[Side, str]] = [("right", "alpha"), ("left", "omega")]
    for side, kept in sides:
        windowed = split(
            document, LongInputPolicy("truncate", 10, 8, side), tokenizer.cls_id, tokenizer.sep_id
        )
        [window] = windowed.windows
        assert window.tokens.length == 10 and windowed.dropped_tokens == document.length - 8
        assert window.tokens.ids[0] == tokenizer.cls_id and window.tokens.ids[-1] == tokenizer.sep_id
        start, end = window.tokens.offsets[-2 if side == "left" else 1]
        assert text[start:end] == kept


def test_a_window_shorter_than_its_special_tokens_or_a_stride_past_it_is_refused() -> None:
    with pytest.raises(ValueError):
        LongInputPolicy("chunk", 2, 1)
    with pytest.raises(ValueError):
        LongInputPolicy("chunk", 10, 9)


def test_sentences_survive_abbreviations_decimals_initials_and_quotes() -> None:
    text = (
        'Dr. Smith paid $3.50 for it at 5 p.m. on Monday. "Is it done?" she asked. '
        "The U.S. economy grew 2.5% in Q3.\n\nA headline without a stop\n\nLast one."
    )
    sentences = [text[start:end] for start, end in sentence_spans(text)]
    assert sentences == [
        "Dr. Smith paid $3.50 for it at 5 p.m. on Monday.",
        '"Is it done?" she asked.',
        "The U.S. economy grew 2.5% in Q3.",
        "A headline without a stop",
        "Last one.",
    ]


def test_each_token_maps_to_the_sentence_it_starts_in() -> None:
    spans = [(0, 10), (11, 20)]
    offsets = ((0, 3), (4, 10), (10, 11), (11, 15), (25, 30))
    assert token_sentences(offsets, spans).tolist() == [0, 0, -1, 1, -1]  # ends are exclusive


def test_selection_skips_near_duplicates_respects_length_and_keeps_document_order() -> None:
    text = (
        "Cats purr loudly. Cats purr loudly! Dogs bark at night. A long sentence about nothing much at all."
    )
    spans = [(0, 17), (18, 35), (36, 55), (56, len(text))]
    scored = [
        SentenceScore(i, s, e, score)
        for i, ((s, e), score) in enumerate(zip(spans, [0.9, 0.8, 0.5, 0.7], strict=True))
    ]
    chosen = select(text, scored, Selection(sentences=2))
    assert [s.index for s in chosen] == [0, 3]  # 1 repeats 0; document order
    assert [s.index for s in select(text, scored, Selection(sentences=2, max_chars=40))] == [0, 2]
    assert [s.index for s in select(text, scored, Selection(sentences=2, keep_order=False))] == [0, 3]
    assert len(select(text, scored, Selection(sentences=None, ratio=0.5))) == 2


def test_a_name_split_by_a_window_border_is_one_entity() -> None:
    """Each window may tag its part of a straddling name B-PER; at a border the two merge."""
    labels = ("O", "B-PER", "I-PER")
    classifier = TokenClassifier(
        MlpHead([(np.eye(3, dtype=np.float32), np.zeros(3, dtype=np.float32))]), labels
    )
    text = "Angela Merkel spoke"
    tokens = TokenizedText(np.array([1, 2, 3]), ((0, 6), (7, 13), (14, 19)), (0, 1, 2), 0)
    states = np.array([[0, 9, 0], [0, 9, 0], [9, 0, 0]], dtype=np.float32)  # B-PER B-PER O
    alone = classifier.entities(text, tokens, states, "simple")
    assert [e.word for e in alone] == ["Angela", "Merkel"]  # two names, as one window would say
    merged = classifier.entities(text, tokens, states, "simple", borders=frozenset({1}))
    assert [(e.label, e.word, e.start, e.end) for e in merged] == [("PER", "Angela Merkel", 0, 13)]
    assert [e.word for e in classifier.entities(text, tokens, states, "first", borders=frozenset({1}))] == [
        "Angela Merkel"
    ]
