"""Ids-only tokenization gives exactly the ids (and truncation) of Hugging Face `tokenizers`,
whichever path a text takes."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.bundle import load_bundle
from engine.fast_wordpiece import FastWordPiece
from engine.tokenization import FAST_PATH_MAX_CHARS, TextTokenizer
from loadtest.workload import load_workload

# ASCII with control characters, words around the 100-character [UNK] limit, and added tokens
# written out: the places where the two tokenizers could part.
HAS_WHEELS = sys.platform == "linux" and platform.machine() == "x86_64"
ascii_texts = st.lists(
    st.one_of(
        st.text(alphabet=st.characters(max_codepoint=127), min_size=1, max_size=40),
        st.text(alphabet="abcdefXYZ", min_size=95, max_size=105),
        # Two halves of a long word around a control character that HF drops (joining them).
        st.tuples(
            st.text(alphabet="ab", min_size=45, max_size=60),
            st.sampled_from("\x00\x0b\x0c\x1c\x1f\x7f\t"),
            st.text(alphabet="cd", min_size=45, max_size=60),
        ).map("".join),
        st.sampled_from(["[SEP]", "[CLS]", "[MASK]", "[UNK]", "[PAD]", "[", "]", "##ing", "e\u0301"]),
    ),
    min_size=1,
    max_size=12,
).map(" ".join)


@pytest.fixture(scope="module")
def tokenizer_path(bundle_dir: Path) -> Path:
    bundle = load_bundle(bundle_dir)
    return bundle.path(bundle.manifest.tokenizer)


@pytest.fixture(scope="module", params=[512, 12])
def tokenizer(tokenizer_path: Path, request: pytest.FixtureRequest) -> TextTokenizer:
    return TextTokenizer(tokenizer_path, request.param)  # 12: truncation in play


def _same_ids(tokenizer: TextTokenizer, texts: list[str]) -> None:
    full = tokenizer.encode_batch(texts)
    paths = [tokenizer.encode_ids_batch(texts)]
    if (inline := tokenizer.encode_ids_inline(texts)) is not None:
        paths.append(inline)
    for ids_only in paths:
        for reference, fast in zip(full, ids_only, strict=True):
            assert fast.ids.tolist() == reference.ids.tolist()
            assert fast.ids.dtype == reference.ids.dtype
            assert fast.dropped_tokens == reference.dropped_tokens
            assert fast.offsets == () and fast.word_ids == ()


def test_the_fast_path_is_installed_where_it_has_wheels(tokenizer: TextTokenizer) -> None:
    if HAS_WHEELS:
        assert tokenizer.fast_ids is not None  # else the tests below compare HF with itself


def test_the_workload_gets_the_same_ids(tokenizer: TextTokenizer) -> None:
    _same_ids(tokenizer, load_workload())


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(texts=st.lists(ascii_texts, min_size=1, max_size=4))
def test_any_ascii_text_gets_the_same_ids(tokenizer: TextTokenizer, texts: list[str]) -> None:
    _same_ids(tokenizer, texts)


def test_texts_the_fast_path_would_get_wrong_go_to_hugging_face(tokenizer_path: Path) -> None:
    fast = FastWordPiece.for_tokenizer_json(tokenizer_path)
    assert fast is not None or not HAS_WHEELS, "flash-tokenizer is not installed"
    if fast is None:
        return
    assert fast.applies("A plain sentence, with punctuation (and digits: 42).\n")
    assert not fast.applies("caf\u00e9")  # not ASCII
    assert not fast.applies("x" * 101)  # HF reads a word this long as [UNK]
    assert fast.applies("x" * 100)
    assert not fast.applies("before [SEP] after")  # HF reads the added token
    assert not fast.applies("ab\x1ccd")  # HF drops the control character: one word
    assert fast.applies("tab\tnew\nline\r")


class CountingFastPath:
    def __init__(self, fast: FastWordPiece) -> None:
        self.fast = fast
        self.texts: list[str] = []

    def applies(self, text: str) -> bool:
        return self.fast.applies(text)

    def ids(self, text: str) -> object:
        self.texts.append(text)
        return self.fast.ids(text)


def test_only_short_texts_take_the_fast_path_which_holds_the_gil(tokenizer_path: Path) -> None:
    """The event loop tokenizes a request in place only when the fast path reads all its texts
    and they are short together; on the tokenizer thread, a text too long to hold the GIL for
    goes to HF (which releases it), whatever else it is."""
    tokenizer = TextTokenizer(tokenizer_path, 512)
    if tokenizer.fast_ids is None:
        assert not HAS_WHEELS, "flash-tokenizer is not installed"
        assert tokenizer.encode_ids_inline(["a short text"]) is None
        return
    counting = CountingFastPath(tokenizer.fast_ids)
    tokenizer.fast_ids = counting  # type: ignore[assignment]
    short = "A plain sentence. " * 10
    long = "word " * (FAST_PATH_MAX_CHARS // 5 + 1)  # every word ASCII and short: only its size
    assert len(long) > FAST_PATH_MAX_CHARS
    inline = tokenizer.encode_ids_inline([short, short])
    assert inline is not None and counting.texts == [short, short]
    assert tokenizer.encode_ids_inline([long]) is None
    assert tokenizer.encode_ids_inline([short] * (FAST_PATH_MAX_CHARS // len(short) + 1)) is None
    assert tokenizer.encode_ids_inline([short, "caf\u00e9"]) is None  # one text HF must read
    counting.texts.clear()
    on_thread = tokenizer.encode_ids_batch([short, long])
    assert counting.texts == [short]
    _same_ids(tokenizer, [short, long])
    assert on_thread[1].dropped_tokens > 0  # HF's truncation, as for any text


def test_another_tokenizer_pipeline_gets_no_fast_path(tokenizer_path: Path, tmp_path: Path) -> None:
    config = json.loads(tokenizer_path.read_text())
    config["normalizer"]["lowercase"] = False  # a cased model: flash-tokenizer is set up uncased
    cased = tmp_path / "tokenizer.json"
    cased.write_text(json.dumps(config))
    assert FastWordPiece.for_tokenizer_json(cased) is None
    assert TextTokenizer(cased, 512).fast_ids is None
