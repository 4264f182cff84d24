"""The server over real HTTP on the real bundle: tasks, contracts and every error path."""

from __future__ import annotations

import concurrent.futures
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import start_server

POSITIVE = [
    "A wonderful, moving film with a brilliant cast; I loved every minute of it.",
    "One of the most beautiful and heartfelt movies of the year.",
]
NEGATIVE = [
    "A dull, boring and badly written mess that wastes its actors.",
    "The worst film I have seen in years: tedious, ugly and stupid.",
]
NER_TEXT = "Shares of Microsoft rose in New York after Bill Gates spoke."
# Tests of the encoder's own behaviour opt out of the cache pool (tests/test_cache_*.py cover it).
FRESH = {"Cache-Control": "no-cache"}


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    assert body["error"]["message"]
    return str(body["error"]["type"])


def test_health_and_models(client: httpx.Client) -> None:
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").json() == {"status": "ready"}
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["sentiment"]["task"] == "classification"
    assert models["sentiment"]["labels"] == ["negative", "positive"]
    assert models["ner"]["task"] == "token-classification"
    assert models["ner"]["precision"] == "int8"


def test_clear_sentiment_gets_the_right_label(client: httpx.Client) -> None:
    response = client.post("/v1/classify", json={"inputs": POSITIVE + NEGATIVE, "model": "sentiment"})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "sentiment"
    labels = [r["labels"][0]["label"] for r in body["results"]]
    assert labels == ["positive"] * len(POSITIVE) + ["negative"] * len(NEGATIVE)
    for result in body["results"]:
        assert 0.5 < result["labels"][0]["score"] <= 1.0
        assert result["usage"]["tokens"] > 5 and result["usage"]["truncated_tokens"] == 0


@pytest.mark.parametrize(
    ("route", "body"),
    [("/v1/classify", {"inputs": "fine"}), ("/v1/ner", {"inputs": "Paris"}), ("/predict", {"inputs": "ok"}),
     ("/embed", {"inputs": "ok"})],
)  # fmt: skip
def test_responses_say_where_the_time_went(client: httpx.Client, route: str, body: dict[str, object]) -> None:
    response = client.post(route, json=body, headers=FRESH)
    assert response.status_code == 200
    times = {
        name: float(response.headers[f"x-{name}-time"])
        for name in ("total", "tokenization", "queue", "inference")
    }
    assert all(value >= 0 for value in times.values())
    assert times["inference"] > 0
    assert times["total"] >= max(times["tokenization"], times["inference"])
    assert response.headers["x-cache-hits"] == "0"


def test_top_k_returns_labels_best_first_summing_to_one(client: httpx.Client) -> None:
    result = client.post("/v1/classify", json={"inputs": POSITIVE[0], "top_k": 2}).json()["results"][0]
    scores = [ls["score"] for ls in result["labels"]]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)


def test_raw_scores_are_logits_in_the_same_order(client: httpx.Client) -> None:
    probs = client.post("/v1/classify", json={"inputs": POSITIVE[0], "top_k": 2}).json()["results"][0]
    raw = client.post("/v1/classify", json={"inputs": POSITIVE[0], "top_k": 2, "raw_scores": True})
    logits = raw.json()["results"][0]["labels"]
    assert [x["label"] for x in logits] == [x["label"] for x in probs["labels"]]
    assert sum(x["score"] for x in logits) != pytest.approx(1.0, abs=1e-3)


def test_ner_finds_people_places_and_organisations_with_exact_offsets(client: httpx.Client) -> None:
    response = client.post("/v1/ner", json={"inputs": NER_TEXT})
    assert response.status_code == 200
    entities = response.json()["results"][0]["entities"]
    found = {(e["entity_group"], e["word"]) for e in entities}
    for entity in entities:
        assert NER_TEXT[entity["start"] : entity["end"]] == entity["word"]
    assert found == {("ORG", "Microsoft"), ("LOC", "New York"), ("PER", "Bill Gates")}


@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
def test_every_aggregation_strategy_slices_the_input(client: httpx.Client, strategy: str) -> None:
    text = "Mr. Jean-Claude Juncker visited Zürich and the United Nations headquarters."
    body = client.post("/v1/ner", json={"inputs": text, "aggregation_strategy": strategy}).json()
    entities = body["results"][0]["entities"]
    assert entities
    key = "entity" if strategy == "none" else "entity_group"
    for entity in entities:
        assert text[entity["start"] : entity["end"]] == entity["word"]
        assert 0.0 <= entity["score"] <= 1.0
        assert entity[key]
    if strategy == "none":
        assert all(isinstance(e["index"], int) for e in entities)


def test_an_input_gives_the_same_answer_alone_and_in_a_mixed_batch(client: httpx.Client) -> None:
    """Tolerance: dynamic INT8 quantizes activations per batch tensor, so scores may move by
    up to 0.02 when the batch changes; labels and entity spans must not."""
    fillers = [
        "Short.",
        "A much longer sentence about the economy, the weather in London, football results, "
        "and everything else that fills a newspaper on a slow Sunday afternoon in late autumn.",
        NEGATIVE[0],
    ]
    alone = client.post("/v1/classify", json={"inputs": POSITIVE[0], "top_k": 2}, headers=FRESH)
    batched = client.post(
        "/v1/classify", json={"inputs": [fillers[0], POSITIVE[0], *fillers[1:]], "top_k": 2}, headers=FRESH
    )
    mixed = batched.json()["results"][1]
    assert alone.headers["x-cache-hits"] == batched.headers["x-cache-hits"] == "0"
    assert alone.json()["results"][0]["labels"][0]["label"] == mixed["labels"][0]["label"]
    for a, b in zip(alone.json()["results"][0]["labels"], mixed["labels"], strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=0.02)

    ner_alone = client.post("/v1/ner", json={"inputs": NER_TEXT}, headers=FRESH).json()
    ner_alone = ner_alone["results"][0]["entities"]
    ner_mixed = client.post("/v1/ner", json={"inputs": [*fillers, NER_TEXT]}, headers=FRESH).json()
    ner_mixed = ner_mixed["results"][3]["entities"]
    assert [(e["entity_group"], e["start"], e["end"]) for e in ner_alone] == [
        (e["entity_group"], e["start"], e["end"]) for e in ner_mixed
    ]


def test_concurrent_requests_each_get_their_own_answer(client: httpx.Client) -> None:
    texts = (POSITIVE + NEGATIVE) * 6
    expected = (["positive"] * 2 + ["negative"] * 2) * 6

    def classify(text: str) -> str:
        return str(
            client.post("/v1/classify", json={"inputs": text}).json()["results"][0]["labels"][0]["label"]
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(classify, texts)) == expected


def test_tei_predict_contract(client: httpx.Client) -> None:
    single = client.post("/predict", json={"inputs": POSITIVE[0]}).json()
    assert [s["label"] for s in single] == ["positive", "negative"]
    assert single[0]["score"] >= single[1]["score"]
    batch = client.post("/predict", json={"inputs": [POSITIVE[0], NEGATIVE[0]]}).json()
    assert [scores[0]["label"] for scores in batch] == ["positive", "negative"]
    long_text = "word " * 2000
    assert error_of(client.post("/predict", json={"inputs": long_text}), 413) == "payload_too_large"
    truncated = client.post("/predict", json={"inputs": long_text, "truncate": True})
    assert truncated.status_code == 200


def test_tei_embed_contract(client: httpx.Client) -> None:
    vectors = client.post("/embed", json={"inputs": ["a cat", "a dog"]}).json()
    assert len(vectors) == 2 and len(vectors[0]) == 384
    assert sum(v * v for v in vectors[0]) == pytest.approx(1.0, abs=1e-4)


def test_long_input_is_truncated_and_reported(client: httpx.Client) -> None:
    text = "The plot is great. " * 300
    usage = client.post("/v1/classify", json={"inputs": text}).json()["results"][0]["usage"]
    assert usage["tokens"] == 512
    assert usage["truncated_tokens"] > 0


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"inputs": []}, "at least one"),
        ({"inputs": ""}, "empty"),
        ({"inputs": ["fine", "   "]}, "input 1 is empty"),
        ({"inputs": 5}, "inputs"),
        ({"inputs": [1, 2]}, "inputs"),
        ({}, "inputs"),
        ({"inputs": "x", "model": "nope"}, "unknown model"),
        ({"inputs": "x", "model": "ner"}, "token-classification"),
        ({"inputs": "x", "top_k": 0}, "top_k"),
        ({"inputs": "x", "unexpected": 1}, "unexpected"),
        ({"inputs": "x", "long_input": "chop"}, "long_input"),
    ],
)
def test_classify_validation_errors_are_422(
    client: httpx.Client, body: dict[str, object], fragment: str
) -> None:
    response = client.post("/v1/classify", json=body)
    assert error_of(response, 422) == "validation_error"
    assert fragment in response.json()["error"]["message"]


def test_ner_validation_errors_are_422(client: httpx.Client) -> None:
    response = client.post("/v1/ner", json={"inputs": "x", "aggregation_strategy": "median"})
    assert error_of(response, 422) == "validation_error"
    response = client.post("/v1/ner", json={"inputs": "x", "model": "sentiment"})
    assert error_of(response, 422) == "validation_error"


def test_invalid_json_is_422(client: httpx.Client) -> None:
    response = client.post(
        "/v1/classify", content=b'{"inputs": ', headers={"content-type": "application/json"}
    )
    assert error_of(response, 422) == "validation_error"


def test_too_many_inputs_and_too_large_bodies_are_413(client: httpx.Client) -> None:
    assert error_of(client.post("/v1/classify", json={"inputs": ["x"] * 65}), 413) == "payload_too_large"
    huge = {"inputs": "a" * 3_000_000}
    assert error_of(client.post("/v1/classify", json=huge), 413) == "payload_too_large"
    assert error_of(client.post("/v1/classify", json={"inputs": "a " * 300_000}), 413) == "payload_too_large"


def test_chunked_body_over_the_limit_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": "'
        for _ in range(40):
            yield b"a" * 100_000
        yield b'"}'

    response = client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    assert error_of(response, 413) == "payload_too_large"


def test_a_deadline_that_cannot_be_met_is_504(client: httpx.Client) -> None:
    response = client.post(
        "/v1/classify", json={"inputs": "long text " * 200}, headers={"X-Request-Timeout": "0.0001"}
    )
    assert error_of(response, 504) == "deadline_exceeded"
    bad = client.post("/v1/classify", json={"inputs": "x"}, headers={"X-Request-Timeout": "soon"})
    assert error_of(bad, 422) == "validation_error"
    ok = client.post("/v1/classify", json={"inputs": "fine"}, headers={"X-Request-Timeout": "10"})
    assert ok.status_code == 200


def test_priority_header_is_checked_and_served(client: httpx.Client) -> None:
    for priority in ("high", "normal", "low"):
        response = client.post("/v1/classify", json={"inputs": "fine"}, headers={"X-Priority": priority})
        assert response.status_code == 200
    assert error_of(client.post("/v1/classify", json={"inputs": "x"}, headers={"X-Priority": "urgent"}), 422)


def test_unknown_routes_and_methods_answer_json(client: httpx.Client) -> None:
    assert error_of(client.get("/v1/nothing"), 404) == "not_found"
    assert client.get("/v1/classify").status_code == 405
    assert "error" in client.get("/v1/classify").json()


def test_metrics_expose_the_serving_histograms(client: httpx.Client) -> None:
    client.post("/v1/classify", json={"inputs": POSITIVE})
    text = client.get("/metrics").text
    for name in [
        "sparsebert_request_duration_seconds_bucket",
        "sparsebert_tokenize_duration_seconds_bucket",
        "sparsebert_queue_duration_seconds_bucket",
        "sparsebert_inference_duration_seconds_bucket",
        "sparsebert_batch_size_bucket",
        "sparsebert_batch_tokens_bucket",
        "sparsebert_batch_padding_ratio_bucket",
        "sparsebert_queue_depth",
        "sparsebert_rejections_total",
        "sparsebert_latency_prediction_error_ratio_bucket",
        "sparsebert_build_info",
    ]:
        assert name in text, name
    runtime_cpu = re.search(r"^sparsebert_runtime_cpu_seconds_total ([0-9.e+-]+)$", text, re.MULTILINE)
    assert runtime_cpu is not None and float(runtime_cpu.group(1)) > 0  # the encoder's own CPU
    input_tokens = re.search(r"^sparsebert_input_tokens_count ([0-9.e+]+)$", text, re.MULTILINE)
    assert input_tokens is not None and float(input_tokens.group(1)) >= len(POSITIVE)
    assert re.search(
        r'request_duration_seconds_count\{(?=[^}]*route="/v1/classify")(?=[^}]*task="sentiment")'
        r'(?=[^}]*status="200")',
        text,
    )


def test_docs_render_from_local_assets(client: httpx.Client) -> None:
    page = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in page
    assert "cdn" not in page.lower()
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/ner", "/predict", "/embed", "/v1/models"} <= set(schema["paths"])


@pytest.fixture(scope="module")
def small_queue_client(bundle_dir: Path) -> Iterator[httpx.Client]:
    yield from start_server(
        bundle_dir, "--max-queue-items", "4", "--max-inputs-per-request", "4", "--runtimes", "1"
    )


def test_overload_gets_a_fast_429_with_retry_after(small_queue_client: httpx.Client) -> None:
    def post(index: int) -> httpx.Response:
        texts = [f"{index}.{j} " + "a long sentence to keep the encoder busy " * 20 for j in range(4)]
        return small_queue_client.post("/v1/classify", json={"inputs": texts})

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(post, range(24)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}
    assert 429 in statuses and 200 in statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert error_of(rejected, 429) == "overloaded"
    assert int(rejected.headers["Retry-After"]) >= 1
    # Accepted requests were all answered in full: nothing accepted is lost.
    assert all(len(r.json()["results"]) == 4 for r in responses if r.status_code == 200)


def test_clients_that_hang_up_leave_the_queue_before_compute(small_queue_client: httpx.Client) -> None:
    url = httpx.URL(str(small_queue_client.base_url))

    def request(index: int) -> bytes:  # distinct texts: identical ones would share one encoding
        body = orjson.dumps({"inputs": [f"{index} " + "a long sentence to keep the encoder busy " * 40]})
        return (
            f"POST /v1/classify HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    before = _rejections(small_queue_client, "cancelled")
    sockets = [socket.create_connection((url.host, url.port)) for _ in range(4)]
    for index, sock in enumerate(sockets):
        sock.sendall(request(index))
    time.sleep(0.05)  # parsed and queued behind the first, which computes on the one runtime
    for sock in sockets[1:]:
        sock.close()
    assert b"200 OK" in sockets[0].recv(65536)
    sockets[0].close()
    deadline = time.monotonic() + 10
    while _rejections(small_queue_client, "cancelled") - before < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _rejections(small_queue_client, "cancelled") - before >= 1
    assert small_queue_client.get("/metrics").text.count('status="499"') >= 1


def _rejections(client: httpx.Client, reason: str) -> float:
    match = re.search(
        rf'sparsebert_rejections_total\{{reason="{reason}"\}} ([0-9.e+]+)', client.get("/metrics").text
    )
    return float(match.group(1)) if match else 0.0
