"""The cache pool through real servers sharing a real Redis: tiers across replicas, states
reused across tasks, coalescing, opt-out, flush, and Redis dying under load."""

from __future__ import annotations

import concurrent.futures
import itertools
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest.redis_server import RedisServer
from loadtest.server_process import free_port
from tests.conftest import start_server


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """The value of one sample of the server's /metrics (0 if absent)."""
    for line in client.get("/metrics").text.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(rf"{name}(?:\{{([^}}]*)\}})? (\S+)$", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match.group(2))
    return 0.0


_texts = itertools.count()


def unique(text: str) -> str:
    """The text made distinct from every other test's, deterministically (so a failure reproduces)."""
    return f"{text} [{next(_texts)}]"


@pytest.fixture(scope="module")
def replicas(bundle_dir: Path, redis_server: RedisServer) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    flags = ("--cache-redis-url", redis_server.url, "--cache-namespace", "replicas", "--admin-api")
    first = start_server(bundle_dir, *flags)
    second = start_server(bundle_dir, *flags)
    try:
        yield next(first), next(second)
    finally:
        first.close()
        second.close()


def test_a_repeat_comes_from_l1_and_another_replica_reads_it_from_redis(
    replicas: tuple[httpx.Client, httpx.Client],
) -> None:
    a, b = replicas
    text = unique("A wonderful, moving film with a brilliant cast.")
    first = a.post("/v1/classify", json={"inputs": text})
    assert first.headers["x-cache-hits"] == "0" and float(first.headers["x-inference-time"]) > 0
    again = a.post("/v1/classify", json={"inputs": text})
    assert again.headers["x-cache-hits"] == "1" and float(again.headers["x-inference-time"]) == 0
    assert again.json() == first.json()
    assert metric(a, "sparsebert_cache_lookups_total", tier="l1", kind="result", result="hit") >= 1

    time.sleep(0.2)  # the first replica's Redis writes are queued, not awaited by the request
    l2_hits = metric(b, "sparsebert_cache_lookups_total", tier="l2", kind="result", result="hit")
    other = b.post("/v1/classify", json={"inputs": text})
    assert other.headers["x-cache-hits"] == "1" and other.json() == first.json()
    assert metric(b, "sparsebert_cache_lookups_total", tier="l2", kind="result", result="hit") == l2_hits + 1


def test_a_text_encoded_for_one_task_is_not_encoded_again_for_another(
    replicas: tuple[httpx.Client, httpx.Client],
) -> None:
    a, b = replicas
    text = unique("Shares of Microsoft rose in New York after Bill Gates spoke.")
    assert a.post("/v1/classify", json={"inputs": text}).headers["x-cache-hits"] == "0"
    time.sleep(0.2)
    batches = metric(b, "sparsebert_batch_size_count")
    ner = b.post("/v1/ner", json={"inputs": text})  # no NER result anywhere; the states are in Redis
    assert ner.headers["x-cache-hits"] == "1" and float(ner.headers["x-inference-time"]) == 0
    assert metric(b, "sparsebert_batch_size_count") == batches  # the encoder did not run
    fresh = b.post("/v1/ner", json={"inputs": text}, headers={"Cache-Control": "no-cache"})
    cached_spans, fresh_spans = (
        {(e["entity_group"], e["start"], e["end"]): e["score"] for e in r.json()["results"][0]["entities"]}
        for r in (ner, fresh)
    )
    # States are cached as bfloat16: a borderline tag may flip (measured: 1 in 11k), a confident
    # entity may not, and every score moves by far less than 0.01.
    assert ("PER", 43, 53) in cached_spans and ("PER", 43, 53) in fresh_spans  # Bill Gates
    for span, score in fresh_spans.items():
        if score >= 0.9:
            assert abs(cached_spans[span] - score) < 0.01, span


def test_ner_and_chunked_classification_results_are_cached_per_long_input_policy(
    replicas: tuple[httpx.Client, httpx.Client],
) -> None:
    a, _ = replicas
    text = unique("Angela Merkel met Emmanuel Macron in Paris. " * 40)  # ~480 tokens: several windows
    results = metric(a, "sparsebert_cache_lookups_total", tier="l1", kind="result", result="hit")
    first = a.post("/v1/ner", json={"inputs": text})
    again = a.post("/v1/ner", json={"inputs": text})
    assert again.json() == first.json() and float(again.headers["x-inference-time"]) == 0
    assert metric(a, "sparsebert_cache_lookups_total", tier="l1", kind="result", result="hit") == results + 1
    # Another policy is another result: read in 128-token windows, not the cached default's.
    other = a.post("/v1/ner", json={"inputs": text, "long_input": {"strategy": "chunk", "window": 128}})
    assert other.json()["results"][0]["usage"]["windows"] != first.json()["results"][0]["usage"]["windows"]
    body = {"inputs": text, "model": "topic", "long_input": "chunk"}
    topic = a.post("/v1/classify", json=body)
    assert a.post("/v1/classify", json=body).json() == topic.json()
    assert metric(a, "sparsebert_cache_lookups_total", tier="l1", kind="result", result="hit") == results + 2


def test_identical_concurrent_requests_run_the_encoder_once(
    replicas: tuple[httpx.Client, httpx.Client],
) -> None:
    a, _ = replicas
    text = unique("A long review that keeps the encoder busy for a while. " * 30)
    inputs_before = metric(a, "sparsebert_batch_size_sum")
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: a.post("/v1/classify", json={"inputs": text}), range(12)))
    assert all(r.status_code == 200 for r in responses)
    assert len({r.content for r in responses}) == 1
    assert metric(a, "sparsebert_batch_size_sum") - inputs_before == 1  # one input encoded, once


def test_opting_out_computes_afresh(replicas: tuple[httpx.Client, httpx.Client]) -> None:
    a, _ = replicas
    text = unique("One of the most beautiful and heartfelt movies of the year.")
    a.post("/v1/classify", json={"inputs": text})
    for body, headers in (
        ({"inputs": text, "cache": False}, {}),
        ({"inputs": text}, {"Cache-Control": "no-cache"}),
        ({"inputs": text}, {"Cache-Control": "max-age=0, no-store"}),
    ):
        fresh = a.post("/v1/classify", json=body, headers=headers)
        assert fresh.headers["x-cache-hits"] == "0" and float(fresh.headers["x-inference-time"]) > 0


def test_flush_empties_l1_and_the_namespace_in_redis(
    replicas: tuple[httpx.Client, httpx.Client], redis_server: RedisServer
) -> None:
    a, _ = replicas
    text = unique("A dull, boring and badly written mess.")
    a.post("/v1/classify", json={"inputs": text})
    time.sleep(0.2)
    assert redis_server.client().keys("replicas:*")
    flushed = a.post("/admin/cache/flush").json()
    assert flushed["flushed"] is True and flushed["redis_keys_deleted"] >= 2
    assert redis_server.client().keys("replicas:*") == []
    assert a.post("/v1/classify", json={"inputs": text}).headers["x-cache-hits"] == "0"


def test_admin_routes_are_off_unless_enabled(client: httpx.Client) -> None:
    assert client.post("/admin/cache/flush").status_code == 404


def test_redis_killed_and_restarted_under_load_fails_no_request(
    bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    redis = RedisServer(free_port(), tmp_path_factory.mktemp("redis-kill"))
    redis.start()
    server = start_server(
        bundle_dir, "--cache-redis-url", redis.url, "--cache-redis-timeout-ms", "50",
        "--cache-redis-retry-s", "0.5",
    )  # fmt: skip
    try:
        client = next(server)

        def text(i: int) -> str:  # half repeats (L1 hits), half new texts (L1 misses: Redis is asked)
            return f"Review number {i % 20 if i % 2 else i}: a decent film with a few good scenes."

        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=str(client.base_url), timeout=30) as own:
                i = threading.get_ident() % 1_000_000 * 1000
                while not stop.is_set():
                    statuses.append(own.post("/v1/classify", json={"inputs": text(i)}).status_code)
                    i += 1

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        redis.stop()
        time.sleep(2.0)
        errors_while_down = metric(
            client, "sparsebert_cache_lookups_total", tier="l2", kind="result", result="error"
        )
        redis.start()
        time.sleep(2.0)
        stop.set()
        for thread in threads:
            thread.join()
        assert len(statuses) > 100 and set(statuses) == {200}, f"{len(statuses)} requests"
        assert errors_while_down > 0  # the server did notice Redis was gone
        assert metric(client, "sparsebert_cache_breaker_state") == 0  # closed again
        fresh = unique("After the restart")
        client.post("/v1/classify", json={"inputs": fresh})
        deadline = time.monotonic() + 5
        while not redis.client().dbsize() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert redis.client().dbsize() > 0  # writes reach Redis again
    finally:
        server.close()
        redis.stop()
