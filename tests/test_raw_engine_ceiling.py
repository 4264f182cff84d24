"""The benchmark's raw-engine ceiling counts whole passes over its batches: a run cut off
mid-pass over-counts whichever batches come first (in sorted order, the shortest). A load point
runs in slices with the ceiling measured in the gaps, each slice compared with the gaps either
side of it. A point measured several times is reported by its median ratio to the ceiling."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time

import numpy as np
import pytest

from engine.runtime.base import RuntimeOutput
from loadtest.bench import RawEngine, RawRate, median_run, slices_ceiling
from loadtest.closed_loop import Interleave, LoadResult, closed_loop


class RecordingSession:
    name = "recording"

    def __init__(self, seen: collections.Counter[int], seconds: float) -> None:
        self.seen = seen
        self.seconds = seconds

    def encode(self, ids: np.ndarray, mask: np.ndarray, verify: bool = False) -> RuntimeOutput:
        self.seen[int(ids[0, 0])] += 1
        time.sleep(self.seconds)
        return RuntimeOutput(np.zeros((*ids.shape, 1), dtype=np.float32))


def test_every_batch_runs_equally_often() -> None:
    seen: collections.Counter[int] = collections.Counter()
    engine = RawEngine.__new__(RawEngine)
    engine.sessions = [RecordingSession(seen, 0.001), RecordingSession(seen, 0.003)]
    batches = [(np.full((size, 4), index), np.ones((size, 4))) for index, size in enumerate((8, 4, 2, 1, 1))]
    rate = engine.rate(batches, duration_s=0.05)
    passes = set(seen.values())
    assert len(passes) == 1, seen  # the same number of runs for every batch
    assert passes.pop() >= 2  # passes kept starting until the duration had passed
    assert rate.texts_per_s > 0
    assert rate.cpu_s_per_text < 0.003  # the sessions sleep: next to no CPU


def _run(rps: float, ceiling: float) -> LoadResult:
    return LoadResult("server", 32, 100, 0, 10.0, rps, 1.0, 2.0, 0.03, ceiling_sorted=ceiling)


def test_a_repeated_point_is_the_run_with_the_median_ratio_to_its_own_ceiling() -> None:
    # By throughput alone the middle run would be the 310 req/s one; by ratio it is the 340.
    runs = [_run(300.0, 400.0), _run(340.0, 400.0), _run(310.0, 320.0)]
    chosen = median_run(runs)
    assert chosen.rps == 340.0
    assert chosen.ratio_runs == [0.75, 0.85, 0.969]
    assert median_run([_run(300.0, 400.0), _run(340.0, 400.0)]).rps == 300.0  # even: the lower


class CountingServer:
    """An HTTP/1.1 server that answers every POST after `delay_s`, counting what is in flight."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.in_flight = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):  # the client closed its connection
            await self._answer(reader, writer)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            self.in_flight += 1
            await asyncio.sleep(self.delay_s)
            self.in_flight -= 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")


def test_a_sliced_load_pauses_for_each_gap_and_counts_only_its_slices() -> None:
    server = CountingServer(0.004)
    seen_in_flight: list[int] = []

    def gap() -> None:
        seen_in_flight.append(server.in_flight)
        time.sleep(0.3)  # as long as a slice: counted, it would halve the rate

    async def scenario() -> tuple[LoadResult, float]:
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        plan = Interleave(gap, slice_s=0.3, settle_s=0.05)
        started = time.perf_counter()
        result = await closed_loop(port, ["a text"], 4, "sliced", duration_s=0.9, interleave=plan)
        listener.close()
        return result, time.perf_counter() - started

    result, wall = asyncio.run(scenario())
    assert seen_in_flight == [0, 0, 0, 0]  # three slices, a gap before each and one after
    assert len(result.slice_seconds) == 3
    assert all(0.24 <= seconds <= 0.35 for seconds in result.slice_seconds)  # settling left out
    assert sum(result.slice_requests) == result.requests < result.completed
    assert result.seconds < 1.0 < wall
    assert result.rps > 1.5 * result.completed / wall  # the gaps are not in the rate


def test_each_slice_is_compared_with_the_gaps_either_side_of_it() -> None:
    gaps = [RawRate(rate, 0.0) for rate in (400.0, 440.0, 360.0)]
    # Slice one: (400 + 440) / 2 = 420 for 2 s; slice two: (440 + 360) / 2 = 400 for 1 s.
    assert slices_ceiling([2.0, 1.0], gaps) == (420.0 * 2 + 400.0) / 3
    with pytest.raises(ValueError):
        slices_ceiling([2.0, 1.0], gaps[:2])
