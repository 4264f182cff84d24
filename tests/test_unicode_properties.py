"""Property tests of the text path: any Unicode input gives a result whose offsets slice the
input, or a 4xx; never a 500. (Found this way: lone surrogates in JSON used to be a 500.)"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.bundle import load_bundle
from engine.tasks.heads import MlpHead
from engine.tasks.ner import AGGREGATIONS, TokenClassifier
from engine.tokenization import TextTokenizer

# Letters, marks (combining accents), symbols (emoji), separators, controls, right-to-left scripts.
HARD = "e\u0301\u0308\u200d\u200f\u202e\u05d0\u0627\U0001f600\U0001f1eb\U0001f1f7\x00\x07\t\n\u3000\ufeff"
texts = st.text(
    alphabet=st.one_of(st.characters(codec="utf-8"), st.sampled_from(HARD)),
    min_size=1,
    max_size=120,
)


@pytest.fixture(scope="module")
def ner_parts(bundle_dir: Path) -> tuple[TextTokenizer, TokenClassifier]:
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    tokenizer = TextTokenizer(bundle.path(manifest.tokenizer), manifest.max_length)
    head = MlpHead.load(bundle.path(manifest.tasks["ner"].head))
    return tokenizer, TokenClassifier(head, manifest.tasks["ner"].labels)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(text=texts, seed=st.integers(0, 2**32 - 1))
def test_every_entity_slices_its_input(
    ner_parts: tuple[TextTokenizer, TokenClassifier], text: str, seed: int
) -> None:
    tokenizer, classifier = ner_parts
    [tokens] = tokenizer.encode_batch([text])
    # Random states make the head tag tokens at random: every aggregation meets every shape.
    states = np.random.default_rng(seed).normal(0, 3, size=(tokens.length, 384)).astype(np.float32)
    for aggregation in AGGREGATIONS:
        for entity in classifier.entities(text, tokens, states, aggregation):
            assert 0 <= entity.start < entity.end <= len(text)
            assert text[entity.start : entity.end] == entity.word


surrogate_texts = st.text(
    alphabet=st.one_of(st.characters(), st.sampled_from("\ud800\udfff\udc00" + HARD)), max_size=60
)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(text=surrogate_texts)
def test_the_http_api_answers_any_unicode_with_a_result_or_a_4xx(client: httpx.Client, text: str) -> None:
    body = json.dumps({"inputs": [text]}).encode()  # \\u escapes: lone surrogates travel as JSON allows
    for route in ("/v1/ner", "/v1/classify"):
        response = client.post(route, content=body, headers={"content-type": "application/json"})
        assert response.status_code < 500, response.text
        if response.status_code != 200:
            assert 400 <= response.status_code < 500 and "error" in response.json()
            continue
        if route == "/v1/ner":
            for entity in response.json()["results"][0]["entities"]:
                assert text[entity["start"] : entity["end"]] == entity["word"]
