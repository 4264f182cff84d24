"""Closed-loop load: `concurrency` keep-alive clients, each sending its next request as soon as
the last one is answered, and what it measured (with the load generator's own CPU share)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
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
    ceiling_sorted: float = 0.0  # raw engine, measured beside this point (bench.slices_ceiling)
    ceiling_shuffled: float = 0.0
    cpu: CpuAccount | None = None  # where the server's CPU went (the batching benchmark)
    ratio_runs: list[float] = field(default_factory=list)  # each run's ratio to the sorted ceiling
    completed: int = 0  # every answered request, settling and draining ones too (CPU a request)
    slice_seconds: list[float] = field(default_factory=list)  # each measured slice (Interleave)
    slice_requests: list[int] = field(default_factory=list)

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


@dataclass(frozen=True)
class Interleave:
    """Load in slices with `between` run in the gaps: before the first slice and after each one,
    in a thread, while no request is in flight (the benchmark measures the raw engine there).

    This machine's speed drifts by ~6% within a minute, in swings of several seconds (measured:
    raw-engine passes of ~1 s, lag-one correlation 0.83), so a ceiling measured 2 s from the
    load it is compared with tracks it far better than one measured 10 s away. A slice counts
    only what is answered after its first `settle_s` (the queue filling) and before it closes
    (the requests still in flight then are answered, uncounted, before the gap)."""

    between: Callable[[], None]
    slice_s: float = 2.0
    settle_s: float = 0.25


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
    interleave: Interleave | None = None,
) -> LoadResult:
    """POST /v1/classify with each text. `duration_s`: cycle through the texts for that long
    (with `interleave`: that much load in all, in slices); None: send every text once, in order.
    `progress[0]` counts the requests sent (another thread may read it)."""
    connections = [HttpConnection("127.0.0.1", port) for _ in range(concurrency)]
    encoded = [
        connections[0].encode_post("/v1/classify", orjson.dumps({"inputs": t}), headers) for t in texts
    ]
    answered: list[tuple[float, float]] = []  # (answered at, latency), perf_counter seconds
    errors = 0
    cursor = 0
    in_flight = 0
    finished = False
    stop_at = None if duration_s is None else time.perf_counter() + duration_s
    gate = asyncio.Event()  # open while the clients may send
    if interleave is None:
        gate.set()

    def more() -> bool:
        if interleave is not None:
            return not finished
        return cursor < len(encoded) if stop_at is None else time.perf_counter() < stop_at

    async def user(connection: HttpConnection) -> None:
        nonlocal cursor, errors, in_flight
        while more():
            if not gate.is_set():
                await gate.wait()
                continue
            request = encoded[cursor % len(encoded)]
            cursor += 1
            if progress is not None:
                progress[0] = cursor
            in_flight += 1
            started = time.perf_counter()
            try:
                status, _ = await connection.send(request)
            except (ConnectionError, OSError):
                status = 0
            finally:
                in_flight -= 1
            if status == 200:
                now = time.perf_counter()
                answered.append((now, now - started))
            else:
                errors += 1

    windows: list[tuple[float, float]] = []
    paused_s = 0.0

    async def gap(plan: Interleave) -> None:
        """Stop sending, let what is in flight be answered, run `between`."""
        nonlocal paused_s
        gate.clear()
        while in_flight:
            await asyncio.sleep(0.002)
        paused = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, plan.between)
        paused_s += time.perf_counter() - paused

    async def alternate(plan: Interleave) -> None:
        nonlocal finished
        for _ in range(max(round((duration_s or plan.slice_s) / plan.slice_s), 1)):
            await gap(plan)
            opened = time.perf_counter()
            gate.set()
            await asyncio.sleep(plan.slice_s)
            windows.append((opened + plan.settle_s, time.perf_counter()))
        await gap(plan)
        finished = True
        gate.set()

    # The loop's thread only: `between` may run other threads of this process (the raw engine).
    cpu_before, wall_before = time.thread_time(), time.perf_counter()
    planned = [] if interleave is None else [alternate(interleave)]
    await asyncio.gather(*planned, *(user(c) for c in connections))
    cpu, wall = time.thread_time() - cpu_before, time.perf_counter() - wall_before
    for connection in connections:
        await connection.close()
    if not windows:
        windows = [(wall_before, wall_before + wall)]
    counted = [[latency for at, latency in answered if start <= at <= end] for start, end in windows]
    latencies = [latency for window in counted for latency in window]
    window_seconds = [end - start for start, end in windows]
    measured_s = sum(window_seconds)
    lat = np.array(latencies or [0.0]) * 1000
    return LoadResult(
        setup=setup,
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=round(measured_s, 2),
        rps=round(len(latencies) / measured_s, 1),
        p50_ms=round(float(np.percentile(lat, 50)), 2),
        p99_ms=round(float(np.percentile(lat, 99)), 2),
        loadgen_cpu_share=round(cpu / max(wall - paused_s, 1e-9), 2),
        completed=len(answered),
        slice_seconds=[round(seconds, 3) for seconds in window_seconds] if interleave else [],
        slice_requests=[len(window) for window in counted] if interleave else [],
    )
