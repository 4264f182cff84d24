"""Long documents end to end on the real bundle: windows, truncation reports, the topic task's
aggregator, summaries over HTTP JSON, Server-Sent Events and gRPC, cancellation and deadlines."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.documents import LongInputPolicy, owner_windows, split
from engine.tokenization import TextTokenizer
from loadtest.server_process import free_port
from models.data import bbc
from server.rpc import sparsebert_pb2 as pb
from server.rpc import sparsebert_pb2_grpc as pb_grpc
from tests.conftest import start_server

FILLER = "Officials said the talks would continue next week in the capital. "


@pytest.fixture(scope="module")
def server(bundle_dir: Path) -> Iterator[tuple[httpx.Client, int]]:
    grpc_port = free_port()
    for client in start_server(bundle_dir, "--grpc-port", str(grpc_port)):
        yield client, grpc_port


@pytest.fixture(scope="module")
def tokenizer(bundle_dir: Path) -> TextTokenizer:
    return TextTokenizer(bundle_dir / "tokenizer.json", 512)


def inference_stub(channel: grpc.aio.Channel) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]


def metric(client: httpx.Client, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", client.get("/metrics").text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def long_article(tokens: int, tokenizer: TextTokenizer) -> str:
    """Held-out BBC articles joined until the text has at least `tokens` tokens."""
    articles = bbc.load_splits()["test"]
    text, index = "", 0
    while tokenizer.encode_documents([text])[0].length < tokens:
        text += articles[index % len(articles)].text + "\n\n"
        index += 1
    return text


def test_an_entity_across_a_window_border_is_found_once_with_its_offsets(
    server: tuple[httpx.Client, int], tokenizer: TextTokenizer
) -> None:
    client, _ = server
    # Find where, in a long text of filler, the owner of tokens switches from window 0 to window 1
    # (default windows for a text over 512 tokens: 256 tokens, overlapping by 32).
    name = "Angela Merkel"
    base = FILLER * 60
    [document] = tokenizer.encode_documents([base])
    policy = LongInputPolicy("chunk", 256, LongInputPolicy.default_stride(256))
    windows = split(document, policy, tokenizer.cls_id, tokenizer.sep_id).windows
    switch = int(np.argmax(owner_windows(windows, document.length) == 1))
    # Put the name so that its first token is owned by window 0 and its last by window 1.
    cut = document.offsets[switch - 1][0]
    text = base[:cut] + name + " said the talks would continue. " + base[cut:]
    [placed] = tokenizer.encode_documents([text])
    first = next(i for i, (start, _) in enumerate(placed.offsets) if start == cut)
    owners = owner_windows(split(placed, policy, tokenizer.cls_id, tokenizer.sep_id).windows, placed.length)
    name_tokens = [
        i for i, (start, end) in enumerate(placed.offsets) if cut <= start and end <= cut + len(name)
    ]
    assert first == name_tokens[0] and owners[name_tokens[0]] != owners[name_tokens[-1]]  # it straddles

    response = client.post("/v1/ner", json={"inputs": text})
    assert response.status_code == 200, response.text
    assert float(response.headers["x-tokenization-time"]) > 0
    result = response.json()["results"][0]
    assert result["usage"]["windows"] > 1 and result["usage"]["truncated_tokens"] == 0
    people = [e for e in result["entities"] if e["entity_group"] == "PER"]
    assert [(e["word"], e["start"], e["end"]) for e in people] == [(name, cut, cut + len(name))]
    for entity in result["entities"]:
        assert text[entity["start"] : entity["end"]] == entity["word"]


def test_truncation_is_reported_and_chunking_reads_everything(
    server: tuple[httpx.Client, int], tokenizer: TextTokenizer
) -> None:
    client, _ = server
    text = long_article(1500, tokenizer)
    length = tokenizer.encode_documents([text])[0].length
    truncated = client.post("/v1/classify", json={"inputs": text, "model": "topic"}).json()["results"][0]
    assert truncated["usage"] == {"tokens": 512, "truncated_tokens": length - 510, "windows": 1}
    left = client.post(
        "/v1/ner",
        json={"inputs": text, "long_input": {"strategy": "truncate", "window": 128, "side": "left"}},
    ).json()["results"][0]
    assert left["usage"] == {"tokens": 128, "truncated_tokens": length - 126, "windows": 1}
    assert all(e["start"] >= len(text) // 2 for e in left["entities"]), (len(text), left["entities"][:3])
    chunked = client.post(
        "/v1/classify", json={"inputs": text, "model": "topic", "long_input": "chunk", "return_windows": True}
    ).json()["results"][0]
    assert chunked["usage"]["truncated_tokens"] == 0 and chunked["usage"]["windows"] == len(
        chunked["windows"]
    )
    assert abs(sum(w["weight"] for w in chunked["windows"]) - 1) < 1e-4
    assert chunked["windows"][0]["start"] == 0 and chunked["windows"][-1]["end"] == len(text.rstrip())


def test_topic_chunked_in_128_token_windows_beats_truncation_at_128(
    server: tuple[httpx.Client, int], bundle_dir: Path
) -> None:
    """Every held-out BBC article through the served path, both ways; and the build's own
    measurement (report card) of the whole articles, read at once up to 512 tokens."""
    client, _ = server
    articles = bbc.load_splits()["test"]
    accuracy = {}
    for policy in ("chunk", "truncate"):
        correct = 0
        for first in range(0, len(articles), 32):
            batch = articles[first : first + 32]
            body = {"inputs": [a.text for a in batch], "model": "topic", "cache": False,
                    "long_input": {"strategy": policy, "window": 128}}  # fmt: skip
            results = client.post("/v1/classify", json=body).json()["results"]
            correct += sum(
                r["labels"][0]["label"] == bbc.LABELS[a.label] for r, a in zip(results, batch, strict=True)
            )
        accuracy[policy] = correct / len(articles)
    assert accuracy["chunk"] > accuracy["truncate"] and accuracy["chunk"] >= 0.96, accuracy
    report = json.loads((bundle_dir / "report.json").read_text())["tasks"]["topic"]["test_by_policy"]
    # Served as built, within what batching moves: dynamic INT8 scales each batch's activations
    # by its own range, so a window's states depend a little on its batch companions. Served here:
    # 0.9726-0.9747 in 14 runs of several request sizes and loads, once 0.9684 (a CI run beside other
    # heavy work) against the report's 0.9747: 0.01 is four articles of 475 either way.
    assert abs(report["chunk_128"] - accuracy["chunk"]) <= 0.01
    assert accuracy["chunk"] >= report["whole_512"] - 0.01


def sse_events(client: httpx.Client, body: dict[str, object]) -> list[tuple[str, dict[str, object]]]:
    events = []
    with client.stream(
        "POST", "/v1/summarize", json=body, headers={"Accept": "text/event-stream"}
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        name = ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line.split(":", 1)[1])))
    return events


async def grpc_events(port: int, request: pb.SummarizeRequest) -> list[pb.SummarizeEvent]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return [event async for event in inference_stub(channel).Summarize(request)]


def test_summaries_are_the_same_over_json_sse_and_grpc(
    server: tuple[httpx.Client, int], tokenizer: TextTokenizer
) -> None:
    client, port = server
    text = long_article(2000, tokenizer)
    plain = client.post("/v1/summarize", json={"inputs": text, "sentences": 4}).json()
    assert len(plain["sentences"]) == 4 and plain["usage"]["windows"] > 1
    for sentence in plain["sentences"]:
        assert text[sentence["start"] : sentence["end"]] == sentence["text"]
    indices = [s["index"] for s in plain["sentences"]]
    assert indices == sorted(indices)  # document order

    events = sse_events(client, {"inputs": text, "sentences": 4, "cache": False})
    names = [name for name, _ in events]
    windows = plain["usage"]["windows"]
    assert names == ["progress"] * windows + ["sentence"] * 4 + ["done"]
    assert [e["windows_done"] for n, e in events if n == "progress"] == list(range(1, windows + 1))
    assert [e for n, e in events if n == "sentence"] == events[-1][1]["sentences"]

    streamed = asyncio.run(grpc_events(port, pb.SummarizeRequest(input=text, sentences=4, no_cache=True)))
    kinds = [event.WhichOneof("event") for event in streamed]
    assert kinds == ["progress"] * windows + ["sentence"] * 4 + ["done"]
    over_grpc = [(s.index, s.start, s.end, s.text) for s in streamed[-1].done.sentences]
    assert over_grpc == [(s["index"], s["start"], s["end"], s["text"]) for s in plain["sentences"]]


def test_a_bad_summarize_request_is_a_4xx_before_any_stream(server: tuple[httpx.Client, int]) -> None:
    client, _ = server
    for body in [{"inputs": ""}, {"inputs": "x", "sentences": 0}, {"inputs": "x", "model": "sentiment"}]:
        response = client.post("/v1/summarize", json=body, headers={"Accept": "text/event-stream"})
        assert response.status_code == 422 and response.json()["error"]["type"] == "validation_error"


def wait_for_idle(client: httpx.Client, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while metric(client, "sparsebert_queue_depth") or metric(client, "sparsebert_runtimes_busy"):
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.05)


def test_a_cancelled_stream_stops_consuming_the_engine(
    server: tuple[httpx.Client, int], tokenizer: TextTokenizer
) -> None:
    client, port = server
    text = long_article(32_000, tokenizer)
    wait_for_idle(client)
    before = metric(client, "sparsebert_batch_size_sum")
    total = 0
    with client.stream(
        "POST", "/v1/summarize", json={"inputs": text, "stream": True, "cache": False}
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                total = json.loads(line.split(":", 1)[1])["windows_total"]
                break  # the first progress event: hang up
    wait_for_idle(client)
    encoded = metric(client, "sparsebert_batch_size_sum") - before
    assert total > 120 and encoded < total / 2, (encoded, total)  # the rest left the queue

    async def cancel_over_grpc() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = inference_stub(channel).Summarize(pb.SummarizeRequest(input=text + " ", no_cache=True))
            await call.read()
            call.cancel()

    before = metric(client, "sparsebert_batch_size_sum")
    asyncio.run(cancel_over_grpc())
    wait_for_idle(client)
    assert metric(client, "sparsebert_batch_size_sum") - before < total / 2


def test_grpc_honours_deadlines_health_reflection_and_the_error_taxonomy(
    server: tuple[httpx.Client, int], tokenizer: TextTokenizer
) -> None:
    client, port = server
    text = long_article(8_000, tokenizer)

    async def check() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_stub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await stub.Ner(pb.NerRequest(inputs=[text], no_cache=True), timeout=0.05)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 1.0  # not a hang
            with pytest.raises(grpc.aio.AioRpcError) as empty:
                await stub.Classify(pb.ClassifyRequest(inputs=[""]))
            assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await stub.Classify(pb.ClassifyRequest(inputs=["x"], model="nope"))
            assert (
                unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in unknown.value.details()
            )

            ner = await stub.Ner(pb.NerRequest(inputs=["Shares of Microsoft rose after Bill Gates spoke."]))
            http = client.post("/v1/ner", json={"inputs": "Shares of Microsoft rose after Bill Gates spoke."})
            assert [(e.entity_group, e.start, e.end) for e in ner.results[0].entities] == [
                (e["entity_group"], e["start"], e["end"]) for e in http.json()["results"][0]["entities"]
            ]
            topic = await stub.Classify(
                pb.ClassifyRequest(
                    inputs=[text],
                    model="topic",
                    long_input=pb.LongInput(strategy=pb.LongInput.STRATEGY_CHUNK, window=128),
                )
            )
            assert topic.results[0].usage.windows > 1

            health = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(health_pb2.HealthCheckRequest(service="sparsebert.v1.Inference"))
            assert status.status == health_pb2.HealthCheckResponse.SERVING

            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            listed = [s.name async for r in responses for s in r.list_services_response.service]
            assert "sparsebert.v1.Inference" in listed and "grpc.health.v1.Health" in listed

    asyncio.run(check())
    wait_for_idle(client)  # the call past its deadline left nothing in the queue
