"""Overload on the real bundle: open-loop arrivals at 3x the measured capacity for 20 s, each on a
new connection (the worst case for the server: clients without keep-alive). The accepted
requests stay within the deadline (the SLO the server is given), the excess gets fast 429s,
memory stays bounded, and every request gets an answer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import psutil

from loadtest.closed_loop import closed_loop, run_on_uvloop
from loadtest.http_client import HttpConnection
from loadtest.server_process import free_port, start_server, stop_server
from loadtest.workload import load_workload

SLO_S = 1.0
OVERLOAD = 3.0
SECONDS = 20.0


async def open_loop(port: int, texts: list[str], rate: float, seconds: float) -> list[tuple[int, float]]:
    """Requests sent at `rate` per second on schedule, whatever the answers: (status, latency)."""
    results: list[tuple[int, float]] = []
    headers = {"Cache-Control": "no-store"}
    client = HttpConnection("127.0.0.1", port)
    encoded = [client.encode_post("/v1/classify", orjson.dumps({"inputs": t}), headers) for t in texts]

    async def one(request: bytes) -> None:
        connection = HttpConnection("127.0.0.1", port)
        started = time.perf_counter()
        try:
            status, _ = await asyncio.wait_for(connection.send(request), timeout=SLO_S * 10)
        except (TimeoutError, ConnectionError, OSError):
            status = 0  # no answer: hanging, refused or reset
        results.append((status, time.perf_counter() - started))
        await connection.close()

    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(encoded[i % len(encoded)])))
    await asyncio.gather(*tasks)
    return results


def test_three_times_capacity_gets_fast_429s_and_the_accepted_stay_within_the_slo(bundle_dir: Path) -> None:
    port = free_port()
    server = start_server(
        bundle_dir, port, ("--request-timeout-s", str(SLO_S), "--no-cache", "--no-coalesce")
    )
    try:
        texts = load_workload()
        capacity = run_on_uvloop(
            closed_loop(port, texts[:300], 32, "capacity", headers={"Cache-Control": "no-store"})
        ).rps
        process = psutil.Process(server.pid)
        rss_before = process.memory_info().rss
        # The client on uvloop: it opens ~800 connections a second on the server's two cores, and
        # its own scheduling delays count in the latencies it measures.
        results = run_on_uvloop(open_loop(port, texts, capacity * OVERLOAD, SECONDS))
        rss_after = process.memory_info().rss
        rejections = [
            line for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines()
            if line.startswith("sparsebert_rejections_total")
        ]  # fmt: skip
    finally:
        stop_server(server)
    statuses = [status for status, _ in results]
    accepted = np.array([latency for status, latency in results if status == 200])
    rejected = np.array([latency for status, latency in results if status == 429])
    print(
        f"\ncapacity {capacity:.0f} req/s; offered {capacity * OVERLOAD:.0f} req/s for {SECONDS:.0f} s: "
        f"{len(accepted)} served (p50 {np.percentile(accepted, 50) * 1000:.0f} ms, "
        f"p99 {np.percentile(accepted, 99) * 1000:.0f} ms), {len(rejected)} got 429 "
        f"(p50 {np.percentile(rejected, 50) * 1000:.1f} ms, "
        f"p99 {np.percentile(rejected, 99) * 1000:.1f} ms), "
        f"{statuses.count(504)} got 504; RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"
        "\n" + "\n".join(rejections)
    )
    assert 0 not in statuses, "a request got no answer"
    assert set(statuses) <= {200, 429, 504}
    # Admitted, then past the deadline before their batch: the admission estimate's misses.
    assert statuses.count(504) <= len(statuses) * 0.02
    assert len(accepted) >= capacity * SECONDS * 0.6  # overload does not collapse goodput
    assert len(rejected) >= len(results) * 0.4
    assert np.percentile(accepted, 99) <= SLO_S
    # Fast: a refusal never queues. Its p50 is the server's own time; its tail is the wait for the
    # kernel to hand a new connection to a saturated event loop on 2 cores, not work the server
    # does for it. It grows with the connection rate: 22-187 ms at ~600 new connections/s; since
    # the server's capacity rose (numpy's BLAS on one thread) 3x is ~780/s, and 45-301 ms.
    assert np.percentile(rejected, 50) <= 0.01
    assert np.percentile(rejected, 99) <= 0.5
    assert rss_after - rss_before < 300 * 2**20
