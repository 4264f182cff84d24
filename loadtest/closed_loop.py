"""Closed-loop load: `concurrency` keep-alive clients, each sending its next request as soon as
the last one is answered, and what it measured (with the load generator's own CPU share)."""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import orjson
import uvloop

from loadtest.http_client import HttpConnection

T = TypeVar("T")


@dataclass
class LoadResult:
    setup: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    loadgen_cpu_share: float  # of one core, over the run
    ceiling_sorted: float = 0.0  # raw engine, measured just before and after this point (mean)
    ceiling_shuffled: float = 0.0
    cpu: CpuAccount | None = None  # where the server's CPU went (the batching benchmark)
    ratio_runs: list[float] = field(default_factory=list)  # each run's ratio to the sorted ceiling

    @property
    def sorted_ratio(self) -> float:
        """Throughput over the sorted ceiling measured beside it."""
        return self.rps / self.ceiling_sorted


@dataclass
class CpuAccount:
    """The server process's CPU over one load point, split between its runtime threads and the
    rest (HTTP, JSON, tokenizer, batch formation), against the raw engine's CPU a text."""

    server_ms_per_request: float
    runtime_ms_per_text: float  # the runtime threads' CPU (sparsebert_runtime_cpu_seconds)
    rest_ms_per_request: float
    padding_share: float  # of the padded tokens the runtimes computed
    raw_ms_per_text: float  # the raw engine on its ideal batches, measured beside this point


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_on_uvloop(load: Coroutine[Any, Any, T]) -> T:
    """Run a load generator on a uvloop event loop: its CPU is the server's loss on a 2-core
    machine, and uvloop's streams cost about half of asyncio's."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(load)


async def closed_loop(
    port: int,
    texts: list[str],
    concurrency: int,
    setup: str,
    *,
    duration_s: float | None = None,
    headers: dict[str, str] | None = None,
    progress: list[int] | None = None,
) -> LoadResult:
    """POST /v1/classify with each text. `duration_s`: cycle through the texts for that long;
    None: send every text once, in order. `progress[0]` counts the requests sent (another thread
    may read it)."""
    connections = [HttpConnection("127.0.0.1", port) for _ in range(concurrency)]
    encoded = [
        connections[0].encode_post("/v1/classify", orjson.dumps({"inputs": t}), headers) for t in texts
    ]
    latencies: list[float] = []
    errors = 0
    cursor = 0
    stop_at = None if duration_s is None else time.perf_counter() + duration_s

    def more() -> bool:
        return cursor < len(encoded) if stop_at is None else time.perf_counter() < stop_at

    async def user(connection: HttpConnection) -> None:
        nonlocal cursor, errors
        while more():
            request = encoded[cursor % len(encoded)]
            cursor += 1
            if progress is not None:
                progress[0] = cursor
            started = time.perf_counter()
            try:
                status, _ = await connection.send(request)
            except (ConnectionError, OSError):
                status = 0
            if status == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    cpu_before, wall_before = _cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(user(c) for c in connections))
    cpu, wall = _cpu_seconds() - cpu_before, time.perf_counter() - wall_before
    for connection in connections:
        await connection.close()
    lat = np.array(latencies or [0.0]) * 1000
    return LoadResult(
        setup=setup,
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=round(wall, 2),
        rps=round(len(latencies) / wall, 1),
        p50_ms=round(float(np.percentile(lat, 50)), 2),
        p99_ms=round(float(np.percentile(lat, 99)), 2),
        loadgen_cpu_share=round(cpu / wall, 2),
    )
