"""The benchmark's raw-engine ceiling counts whole passes over its batches: a run cut off
mid-pass over-counts whichever batches come first (in sorted order, the shortest). A point
measured several times is reported by its median ratio to the ceiling."""

from __future__ import annotations

import collections
import time

import numpy as np

from engine.runtime.base import RuntimeOutput
from loadtest.bench import RawEngine, median_run
from loadtest.closed_loop import LoadResult


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
