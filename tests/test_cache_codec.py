"""The cache's binary format: round trips, refusal of anything else, and what bfloat16 states
cost in accuracy on the real bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from engine.bundle import load_bundle
from engine.cache import codec
from engine.requests import ClassifyResult, NerResult, Usage
from engine.runtime.onnx import OnnxEncoderRuntime
from engine.tasks.classify import Classifier, LabelScore
from engine.tasks.heads import MlpHead
from engine.tasks.ner import Entity, TokenClassifier
from engine.tokenization import TextTokenizer
from tests.conftest import ROOT


def test_results_round_trip() -> None:
    classify = ClassifyResult([LabelScore("positive", 0.9), LabelScore("negative", 0.1)], Usage(12, 0))
    assert codec.decode_classify(codec.encode_classify(classify)) == classify
    text = "Bill Gates visited Paris."
    ner = NerResult(
        [Entity("PER", 0.99, "Bill Gates", 0, 10), Entity("LOC", 0.9, "Paris", 19, 24)], Usage(8, 0)
    )
    assert codec.decode_ner(text, codec.encode_ner(ner)) == ner


def test_anything_but_this_format_is_refused() -> None:
    ner = NerResult([Entity("PER", 0.99, "Bill Gates", 0, 10)], Usage(8, 0))
    value = codec.encode_ner(ner)
    with pytest.raises(codec.DecodeError):
        codec.decode_ner("Someone else entirely", value)  # offsets that do not slice this text
    with pytest.raises(codec.DecodeError):
        codec.decode_classify(value)  # another kind
    for payload in (b"not json", b'{"labels": [["x", "high"]], "usage": [1, 0]}', b'{"labels": []}',
                    orjson.dumps({"labels": [["x", 1.0]], "usage": [-1, 0]})):  # fmt: skip
        with pytest.raises(codec.DecodeError):
            codec.decode_classify(b"SBC\x01\x02" + payload)
    with pytest.raises(codec.DecodeError):
        codec.decode_classify(b"SBC\x02\x02" + b"{}")  # a future format version
    states = codec.encode_states(np.ones((3, 4), dtype=np.float32))
    for bad in (states[:-1], states[:8] + (10**6).to_bytes(4, "little") + states[12:], b"SB"):
        with pytest.raises(codec.DecodeError):
            codec.decode_states(bad)


def test_bfloat16_states_keep_every_label_on_real_text(bundle_dir: Path) -> None:
    """The accuracy cost of storing states as bfloat16 (printed with -s; quoted in the README)."""
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    tokenizer = TextTokenizer(bundle.path(manifest.tokenizer), manifest.max_length)
    runtime = OnnxEncoderRuntime(bundle.path(manifest.encoders["int8"].file))
    heads = {name: MlpHead.load(bundle.path(spec.head)) for name, spec in manifest.tasks.items()}
    sentiment = Classifier(heads["sentiment"], manifest.tasks["sentiment"].labels)
    ner = TokenClassifier(heads["ner"], manifest.tasks["ner"].labels)
    lines = (ROOT / "tests" / "data" / "mixed_workload.jsonl").read_text().splitlines()[:150]
    texts = [orjson.loads(line)["text"] for line in lines]
    prob_shift, changed_tokens, tokens_total, changed_labels = 0.0, 0, 0, 0
    for tokens in tokenizer.encode_batch(texts):
        ids = tokens.ids[None, :]
        states = runtime.encode(ids, np.ones_like(ids)).states[0]
        stored = codec.decode_states(codec.encode_states(states))
        exact, cached = sentiment.top_k(states.mean(0), 2), sentiment.top_k(stored.mean(0), 2)
        changed_labels += exact[0].label != cached[0].label
        prob_shift = max(
            prob_shift, abs(exact[0].score - dict((s.label, s.score) for s in cached)[exact[0].label])
        )
        exact_tags = ner.head.logits(states).argmax(-1)
        cached_tags = ner.head.logits(stored).argmax(-1)
        changed_tokens += int((exact_tags != cached_tags).sum())
        tokens_total += len(exact_tags)
    print(
        f"\nbfloat16 states on {len(texts)} texts: sentiment labels changed {changed_labels}, "
        f"max probability shift {prob_shift:.2e}; NER tags changed {changed_tokens}/{tokens_total}"
    )
    assert changed_labels == 0
    assert prob_shift < 5e-3
    assert changed_tokens <= tokens_total // 1000
