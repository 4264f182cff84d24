"""`sparsebert bench --suite documents`: long documents through the server.

- cost per token of documents of 512, 2k, 8k and 32k tokens (NER, chunked: every window is
  encoded), as ratios to the 512-token document: linear cost means ratios near 1;
- the same 8k-token document read in windows of 128, 256 and 512 tokens (the default's evidence);
- time to the first Server-Sent Event of a summary, for 8k- and 32k-token documents;
- a 32k-token stream the client hangs up on after its first event: how long the engine stays
  busy, and how many windows it still encoded.

One client, requests one at a time, cache and coalescing off: this measures computation.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import httpx

from engine.tokenization import TextTokenizer
from loadtest.server_process import start_server, stop_server
from models.data import bbc

SIZES = (512, 2048, 8192, 32768)
FLAGS = ("--no-cache", "--no-coalesce")


def document(tokens: int, tokenizer: TextTokenizer) -> str:
    """Held-out BBC articles joined, cut at exactly `tokens` tokens (special tokens included)."""
    articles = bbc.load_splits()["test"]
    text, index = "", 0
    while (found := tokenizer.encode_documents([text])[0]).length < tokens - 2:
        text += articles[index % len(articles)].text + "\n\n"
        index += 1
    return text[: found.offsets[tokens - 3][1]]


def _metric(client: httpx.Client, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", client.get("/metrics").text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _ner_seconds(client: httpx.Client, text: str, repeats: int, window: int | None = None) -> float:
    body: dict[str, object] = {"inputs": text, "cache": False}
    if window is not None:
        body["long_input"] = {"strategy": "chunk", "window": window}
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        response = client.post("/v1/ner", json=body)
        response.raise_for_status()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _wait_idle(client: httpx.Client) -> None:
    while _metric(client, "sparsebert_queue_depth") or _metric(client, "sparsebert_runtimes_busy"):
        time.sleep(0.01)


def _first_event_seconds(client: httpx.Client, text: str) -> float:
    """Until the first event; then the client hangs up (the engine is let go idle first)."""
    _wait_idle(client)
    started = time.perf_counter()
    first = float("nan")
    body = {"inputs": text, "stream": True, "cache": False}
    with client.stream("POST", "/v1/summarize", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                first = time.perf_counter() - started
                break
    return first


def _cancelled_stream(client: httpx.Client, text: str) -> tuple[float, float, int]:
    """(seconds the engine stayed busy after the hang-up, windows encoded after it, windows in all)."""
    _wait_idle(client)
    encoded_before = _metric(client, "sparsebert_batch_size_sum")
    with client.stream(
        "POST", "/v1/summarize", json={"inputs": text, "stream": True, "cache": False}
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                progress = json.loads(line.split(":", 1)[1])
                break
    hung_up = time.perf_counter()
    _wait_idle(client)
    busy_s = time.perf_counter() - hung_up
    after = _metric(client, "sparsebert_batch_size_sum") - encoded_before - progress["windows_done"]
    return busy_s, after, progress["windows_total"]


def run(bundle: Path, port: int) -> dict[str, object]:
    tokenizer = TextTokenizer(bundle / "tokenizer.json", 512)
    docs = {size: document(size, tokenizer) for size in SIZES}
    process = start_server(bundle, port, FLAGS)
    results: dict[str, object] = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            _ner_seconds(client, docs[2048], 2)  # warm up
            per_token = {}
            for size, text in docs.items():
                seconds = _ner_seconds(client, text, max(3, 32768 // size // 2))
                per_token[size] = seconds / size
            base = per_token[512]
            print("\n| document tokens | ms per 1k tokens | / 512 tokens |\n|---|---|---|")
            for size, cost in per_token.items():
                print(f"| {size} | {cost * 1e6:.1f} | {cost / base:.2f} |")
            results["per_token_ratio"] = {size: round(cost / base, 3) for size, cost in per_token.items()}

            print("\n| window (8k-token document) | ms per 1k tokens |\n|---|---|")
            windows = {}
            for window in (128, 256, 512):
                windows[window] = _ner_seconds(client, docs[8192], 3, window) / 8192
                print(f"| {window} | {windows[window] * 1e6:.1f} |")
            results["window_ms_per_1k_tokens"] = {w: round(c * 1e6, 1) for w, c in windows.items()}

            first = {size: statistics.median(_first_event_seconds(client, docs[size]) for _ in range(5))
                     for size in (8192, 32768)}  # fmt: skip
            print("\n| summary stream | first event ms (median of 5) |\n|---|---|")
            for size, seconds in first.items():
                print(f"| {size} tokens | {seconds * 1000:.0f} |")
            results["first_event_ms"] = {size: round(s * 1000) for size, s in first.items()}

            busy_s, after, total = _cancelled_stream(client, docs[32768])
            print(f"\ncancelled 32k-token stream: engine idle {busy_s * 1000:.0f} ms after the hang-up, "
                  f"{after:.0f} of {total} windows encoded after it")  # fmt: skip
            results["cancel"] = {
                "busy_ms": round(busy_s * 1000),
                "windows_after": after,
                "windows_total": total,
            }
    finally:
        stop_server(process)
    return results
