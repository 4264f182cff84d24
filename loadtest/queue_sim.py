"""A discrete-event simulation of the server's batching, to compare queue policies in seconds.

Closed-loop clients send the benchmark workload's inputs (their token lengths) through the
server's own BatchQueue and LatencyModel (engine/queue.py, engine/cost_model.py); simulated
runtimes take each batch for the time a cost model calibrated on the real server gives, with
its noise, and pause between batches as the event loop hands results back.

Why: through the real server on 2 shared cores, one 10 s run's p99/p50 at concurrency 8 varies
by ~0.1 from run to run, and the host's speed drifts; telling two queue policies apart took
three rounds of three runs each way (sessions 13-14). Simulated, the same comparison takes
seconds and is repeatable (seeded). The batch formation is the server's code, not a model of it:
what the simulation leaves out is the event loop's own CPU, which the calibration folds into
the batch times.

Calibrated on session 15's host (2 vCPUs of an AMD EPYC) from a trace of every batch of the
real server at concurrency 8 (a diagnostic build, 3 x 10 s): 3,771 batches. Without the
shallow-queue size cap (as the server was then) it gives 212 req/s, p50 35.5 ms, p99 82.8 ms,
p99/p50 2.33 at 8 against the server's 200-212 req/s, 35-39, 85-98 and 2.43-2.62, and 242 req/s
and 1.85 at 32 against 234-238 and 1.83-1.95. It also reproduced the direction of the queue
policies measured on the real server before: no compute credit worse, half credit the same,
double credit worse.

Built on SimPy (processes and timeouts); nothing here is hand-rolled scheduling.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Generator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import simpy

from engine.batcher import PREFETCH_MIN_QUEUE, WarmUpPlan
from engine.cost_model import LatencyModel
from engine.queue import Batch, BatchLimits, BatchQueue, QueuedItem


@dataclass(frozen=True)
class ServiceModel:
    """How long things take inside the serving process, fitted to the real server's batch trace.

    A batch of inputs of lengths l_i takes, on one runtime thread beside the event loop,
        fixed + per_input * n + sum(per_token * l_i + per_token_squared * l_i^2)
    times a lognormal noise of median 1 (measured: p90 x1.28, p99 x1.6 of the fit). Between two
    batches a runtime waits for the event loop to hand its results back and the next batch over
    (lognormal, median 1.18 ms, p90 2.4 ms), unless the queue was deep enough for the batcher to
    have formed one ahead (engine/batcher.py PREFETCH_MIN_QUEUE). A request spends `arrival_s`
    in HTTP and tokenization before it is queued and `response_s` after its batch."""

    fixed_s: float = 1.5e-3
    per_input_s: float = 0.2e-3
    per_token_s: float = 0.1e-3
    per_token_squared_s: float = 0.02e-6
    noise_sigma: float = 0.17
    handoff_median_s: float = 1.18e-3
    handoff_sigma: float = 0.59
    arrival_s: float = 0.5e-3
    response_s: float = 0.8e-3

    def batch_s(self, lengths: Sequence[int]) -> float:
        tokens = sum(lengths)
        squares = sum(length * length for length in lengths)
        return (
            self.fixed_s
            + self.per_input_s * len(lengths)
            + self.per_token_s * tokens
            + self.per_token_squared_s * squares
        )

    def noiseless(self) -> ServiceModel:
        return replace(self, noise_sigma=0.0, handoff_sigma=0.0)


@dataclass(frozen=True)
class SimulatedPoint:
    concurrency: int
    requests: int
    throughput: float  # requests per simulated second
    mean_s: float
    p50_s: float
    p99_s: float
    max_queue_s: float  # the longest any input waited for its batch

    @property
    def tail_ratio(self) -> float:
        return self.p99_s / self.p50_s


class _Server:
    def __init__(
        self,
        env: simpy.Environment,
        limits: BatchLimits,
        model: ServiceModel,
        runtimes: int,
        rng: random.Random,
    ) -> None:
        self.env = env
        self.model = model
        self.runtimes = runtimes
        self.rng = rng
        self.latency = LatencyModel()
        self._warm_up(limits)
        self.queue: BatchQueue[simpy.Event] = BatchQueue(limits, self.latency)
        self.max_queue_s = 0.0
        self._work_arrived = env.event()
        for _ in range(runtimes):
            env.process(self._runtime())

    def _warm_up(self, limits: BatchLimits) -> None:
        """Seed the latency model as the batcher's warm-up does: its grid of shapes, padded."""
        plan = WarmUpPlan()
        for max_len in plan.lengths:
            for size in plan.sizes:
                if size * max_len <= limits.max_batch_tokens:
                    self.latency.observe(size, max_len, self.model.batch_s([max_len] * size))
        self.latency.refit()

    def submit(self, length: int) -> simpy.Event:
        done = self.env.event()
        now = self.env.now
        self.queue.put(QueuedItem(length=length, enqueued_at=now, deadline=math.inf, payload=done))
        if not self._work_arrived.triggered:
            self._work_arrived.succeed()
        return done

    def _noise(self, sigma: float) -> float:
        return math.exp(self.rng.gauss(0.0, sigma)) if sigma > 0 else 1.0

    def _next_batch(self) -> Generator[simpy.Event, object, Batch[simpy.Event]]:
        """Wait until an input waits, then form a batch from everything waiting (as the batcher
        does each time a runtime frees up or an input arrives to an idle one)."""
        while True:
            held = False
            if len(self.queue):
                batch = self.queue.next_batch(self.env.now, self.runtimes).batch
                if batch is not None:
                    return batch
                held = True  # the batch could still grow within max_wait_s
            if self._work_arrived.triggered:
                self._work_arrived = self.env.event()
            if held:
                remaining = self.queue.limits.max_wait_s - self.queue.oldest_wait_s(self.env.now)
                yield self._work_arrived | self.env.timeout(max(remaining, 1e-9))
            else:
                yield self._work_arrived

    def _runtime(self) -> Generator[simpy.Event, object, None]:
        model = self.model
        while True:
            batch = yield from self._next_batch()
            started = self.env.now
            for item in batch.items:
                self.max_queue_s = max(self.max_queue_s, started - item.enqueued_at)
            lengths = [item.length for item in batch.items]
            yield self.env.timeout(model.batch_s(lengths) * self._noise(model.noise_sigma))
            self.latency.observe(batch.size, batch.max_len, self.env.now - started)
            for item in batch.items:
                item.payload.succeed()
            if len(self.queue) < PREFETCH_MIN_QUEUE:
                yield self.env.timeout(model.handoff_median_s * self._noise(model.handoff_sigma))


def simulate(
    lengths: Sequence[int],
    concurrency: int,
    *,
    limits: BatchLimits,
    model: ServiceModel = ServiceModel(),
    runtimes: int = 2,
    duration_s: float = 60.0,
    warm_up_s: float = 3.0,
    seed: int = 0,
) -> SimulatedPoint:
    """`concurrency` closed-loop clients, each sending the next of `lengths` (in order, shared, as
    the benchmark's clients do) as soon as its previous answer is back; latencies are counted
    after `warm_up_s`."""
    env = simpy.Environment()
    server = _Server(env, limits, model, runtimes, random.Random(seed))
    workload = itertools.cycle(lengths)
    latencies: list[float] = []

    def client() -> Generator[simpy.Event, object, None]:
        while True:
            sent = env.now
            yield env.timeout(model.arrival_s)
            yield server.submit(next(workload))
            yield env.timeout(model.response_s)
            if sent >= warm_up_s:
                latencies.append(env.now - sent)

    for _ in range(concurrency):
        env.process(client())
    env.run(until=warm_up_s + duration_s)
    measured = np.array(latencies)
    p50, p99 = np.percentile(measured, [50, 99])
    return SimulatedPoint(
        concurrency=concurrency,
        requests=len(measured),
        throughput=len(measured) / duration_s,
        mean_s=float(measured.mean()),
        p50_s=float(p50),
        p99_s=float(p99),
        max_queue_s=server.max_queue_s,
    )
