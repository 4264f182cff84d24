"""Drives the queue: forms batches and hands them to one worker thread per runtime.

Event-driven on the asyncio loop (no polling): a batch is formed when an input arrives or a
runtime finishes, so it is formed from everything that waits at the last moment. Each runtime
has its own thread (ONNX Runtime releases the GIL while it computes) and an inbox.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from engine.cost_model import LatencyModel
from engine.errors import DeadlineExceeded, NotReady
from engine.metrics import EngineMetrics
from engine.queue import Batch, BatchLimits, BatchQueue, Priority, QueuedItem
from engine.runtime.affinity import lower_thread_priority, pin_current_thread
from engine.runtime.base import EncoderRuntime, RuntimeOutput, pad_batch
from engine.tasks.heads import masked_mean

log = logging.getLogger(__name__)
# Batches formed ahead per runtime, beyond the one it computes. Measured through the engine on
# the benchmark workload: prefetching one batch cost ~15% throughput and ~25% p99 at
# concurrency 8 (a batch formed early is smaller, and commits its inputs to one runtime while the
# other may free up first) and gained nothing at 32. Kept as a knob for runtimes (GPUs) whose
# idle gaps between batches cost more.
PREFETCH = 0
# ...except when at least this many inputs wait: then an early batch is as full as a late one,
# and one formed ahead keeps the runtime busy while the event loop is slow to hand it the next
# (under a cache hit load the loop answers many requests per batch). Measured on the cache
# workload: encoder threads busy 0.75 -> 0.78 of a core each, cache-off runs 180 -> 190 req/s.
PREFETCH_MIN_QUEUE = 12
# A batch predicted to take at least this long, formed while every runtime idles and nothing else
# waits, runs on the wide runtime (all cores). Measured at concurrency 1 on the benchmark workload:
# 72 -> 88 req/s, p99 82 -> 54 ms; at 8 and 32 the machine is rarely idle and nothing changes.
# The threshold itself is a judgement (a second thread barely pays on a few-ms batch), not tuned.
WIDE_MIN_S = 0.01
# The runtime threads run at a lower CPU priority than the event loop (nice +10 per thread):
# they use every core the loop leaves, and the loop, which admits, refuses and answers, is never
# starved by them. Without it, at 3x capacity the loop fell behind the runtimes and requests
# waited seconds in the kernel's accept queue before admission could refuse them (429s took
# 2.2 s at p50); see tests/test_overload.py.
RUNTIME_NICENESS = 10
# The queue-wait estimate learns its own error from waits of at least this many seconds (shorter
# ones are noise), by exponential smoothing with this weight per input.
MIN_PREDICTED_WAIT_S = 0.02
WAIT_ERROR_SMOOTHING = 0.02


@dataclass(frozen=True, slots=True)
class EncodedInput:
    states: np.ndarray  # [tokens, hidden], this input's rows only
    pooled: np.ndarray  # [hidden], the mean of `states` (computed per batch on the runtime's thread)
    queue_s: float  # from submission to the start of its batch
    inference_s: float  # its batch's encoder time
    logits: dict[str, np.ndarray] = field(default_factory=dict)  # [labels] per pooled head
    sparsity: float | None = None  # its attention sparsity ratio, where the encoder measures it
    kept_attention_mass: float | None = None  # measured on sampled batches (AttentionVerification)


# Heads on pooled states, run per batch on the runtime's thread: pooled [batch, hidden] ->
# {task: logits [batch, labels]}. One matmul per batch instead of one per input on the event loop
# (the per-input head was 12% of the loop's time under load).
PooledHeads = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True, slots=True)
class _BatchOutput:
    states: np.ndarray  # [batch, max_len, hidden]
    pooled: np.ndarray  # [batch, hidden]
    logits: dict[str, np.ndarray]  # [batch, labels] per head
    seconds: float
    started: float
    sparsity: np.ndarray | None  # [batch]
    kept_attention_mass: np.ndarray | None  # [batch], on verified batches


@dataclass(frozen=True)
class AttentionVerification:
    """Which batches also measure the kept share of dense attention mass: a random `rate` of
    those longer than `above_tokens` (the ones a sparse encoder reads in its blocked form; the
    dense branch keeps all of it). A verified batch costs about a dense attention more."""

    rate: float
    above_tokens: int

    def sample(self, batch: Batch[EncodeJob], rng: random.Random) -> bool:
        return batch.max_len > self.above_tokens and rng.random() < self.rate


@dataclass(frozen=True)
class WarmUpPlan:
    """The shapes the warm-up runs on every runtime (seeding the latency model), and whether the
    batch budget is then set from what they measured (`tune_budget`: the fewest padded tokens per
    batch at which throughput comes within `saturation` of the best measured; shapes up to
    `max_tokens` are tried). On a CPU the settings' budget stands: bigger batches barely pay there."""

    lengths: tuple[int, ...] = (8, 32, 128, 512)
    sizes: tuple[int, ...] = (1, 4, 16)
    tune_budget: bool = False
    max_tokens: int | None = None  # None: the queue's max_batch_tokens
    saturation: float = 0.9


# A GPU's throughput keeps growing with the batch long after a CPU's has flattened: try batches up
# to 32k padded tokens (128 inputs), and let the measurements choose.
GPU_MAX_BATCH_TOKENS = 32768
GPU_WARM_UP = WarmUpPlan(
    lengths=(16, 64, 128, 384, 512), sizes=(1, 8, 32, 128), tune_budget=True, max_tokens=GPU_MAX_BATCH_TOKENS
)


def saturating_budget(measured: list[tuple[int, int, float]], saturation: float) -> int:
    """The fewest padded tokens per batch whose measured throughput (padded tokens/s) is at least
    `saturation` of the best: past it a bigger batch only adds latency."""
    rates = [(size * length / seconds, size * length) for size, length, seconds in measured if seconds > 0]
    best = max(rate for rate, _ in rates)
    return min(tokens for rate, tokens in rates if rate >= saturation * best)


@dataclass(slots=True)
class EncodeJob:
    ids: np.ndarray
    future: asyncio.Future[EncodedInput]


@dataclass(eq=False)
class _Worker:
    runtime: EncoderRuntime
    inbox: queue.SimpleQueue[Batch[EncodeJob] | None] = field(default_factory=queue.SimpleQueue)
    assigned: int = 0  # batches handed over and not yet completed (touched on the loop only)
    thread: threading.Thread | None = None
    running: Batch[EncodeJob] | None = None  # set by its thread while it computes (read by the watchdog)
    running_since: float = 0.0


class Batcher:
    def __init__(
        self,
        runtimes: list[EncoderRuntime],
        limits: BatchLimits,
        metrics: EngineMetrics,
        latency: LatencyModel | None = None,
        *,
        cpus: list[int] | None = None,
        wide: EncoderRuntime | None = None,
        on_fatal: Callable[[str], None] | None = None,
        hang_timeout_s: float = 60.0,
        fatal_after_failures: int = 3,
        verification: AttentionVerification | None = None,
        warm_up: WarmUpPlan = WarmUpPlan(),
    ) -> None:
        """`cpus`: pin runtime thread i to cpus[i] (see engine/runtime/affinity.py).
        `wide`: a runtime using every core, for a lone batch on an idle machine.
        `on_fatal(reason)`: called once when a runtime is dead (`fatal_after_failures` batches in
        a row raised) or hung (one batch ran past `hang_timeout_s`, or 20x its predicted time if
        longer): every waiting input then fails at once with NotReady, and so does every later
        submission, so no request hangs; the process should exit for its orchestrator to restart it.
        `verification`: the batches that also measure the sparse attention's kept mass (None: none).
        `warm_up`: the shapes warm_up runs, and whether their times set the batch budget."""
        if not runtimes:
            raise ValueError("the batcher needs at least one runtime")
        self.latency = latency or LatencyModel()
        self.queue: BatchQueue[EncodeJob] = BatchQueue(limits, self.latency)
        self.metrics = metrics
        self._workers = [_Worker(runtime) for runtime in runtimes]
        # Read when scraped, not set on every change: no lock taken per request on the loop.
        metrics.queue_depth.set_function(lambda: len(self.queue))
        metrics.queue_tokens.set_function(lambda: self.queue.queued_tokens)
        metrics.busy_runtimes.set_function(lambda: sum(1 for worker in self._workers if worker.assigned))
        self._cpus = cpus
        self._wide = _Worker(wide) if wide is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wait_timer: asyncio.TimerHandle | None = None
        self._queued: dict[asyncio.Future[EncodedInput], QueuedItem[EncodeJob]] = {}
        self._pooled_heads: PooledHeads | None = None
        self._on_fatal = on_fatal
        self._hang_timeout_s = hang_timeout_s
        self._fatal_after_failures = fatal_after_failures
        self._failures_in_a_row = 0
        self._wait_error = 1.0  # measured / predicted queue wait, smoothed
        self._watchdog: asyncio.Task[None] | None = None
        self.fatal: str | None = None  # why the runtimes can no longer serve, once they cannot
        self._verification = verification
        self._rng = random.Random()
        self._warm_up_plan = warm_up

    def set_pooled_heads(self, heads: PooledHeads) -> None:
        """Heads to run on each batch's pooled states (the service installs its classifiers)."""
        self._pooled_heads = heads

    @property
    def _all_workers(self) -> list[_Worker]:
        return [*self._workers, *([self._wide] if self._wide else [])]

    @property
    def runtimes(self) -> int:
        return len(self._workers)

    def estimated_wait_s(self) -> float:
        """How long a new input would wait before its batch starts: the latency model's time to
        drain what waits, scaled up by how far such estimates fell short lately (measured at each
        batch start, and at each timeout: under overload the runtimes share the cores with the
        event loop and run slower than the model learned, and admission must know it). Never
        scaled down: inputs that leave the queue early make waits look short, not the runtimes fast."""
        return self.queue.drain_estimate_s(len(self._workers)) * self._wait_error

    def _learn_wait_error(self, item: QueuedItem[EncodeJob], started: float) -> None:
        if item.predicted_wait_s >= MIN_PREDICTED_WAIT_S:
            ratio = min(max((started - item.enqueued_at) / item.predicted_wait_s, 1.0), 4.0)
            self._wait_error += WAIT_ERROR_SMOOTHING * (ratio - self._wait_error)

    def submit(
        self, ids: np.ndarray, deadline: float, priority: Priority = "normal", admitted: bool = False
    ) -> asyncio.Future[EncodedInput]:
        """Queue one tokenized input; raises Overloaded if the queue is full, NotReady once the
        runtimes have failed."""
        if self.fatal is not None:
            raise NotReady(f"the encoder runtime failed ({self.fatal}); retry on another replica")
        loop = self._started_loop()
        future: asyncio.Future[EncodedInput] = loop.create_future()
        item = QueuedItem(
            length=int(ids.shape[0]),
            enqueued_at=time.monotonic(),
            deadline=deadline,
            payload=EncodeJob(ids, future),
            priority=priority,
            predicted_wait_s=self.queue.drain_estimate_s(len(self._workers)),
        )
        self.queue.put(item, admitted)
        self._queued[future] = item
        future.add_done_callback(lambda f: self._on_waiter_done(item, f))
        self._dispatch()
        return future

    def _started_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            for index, worker in enumerate(self._all_workers):
                worker.thread = threading.Thread(
                    target=self._work, args=(worker,), name=f"runtime-{index}", daemon=True
                )
                worker.thread.start()
            self._watchdog = self._loop.create_task(self._watch(), name="runtime-watchdog")
        return self._loop

    async def _watch(self) -> None:
        """Declare a runtime hung when one batch runs far past what it should take."""
        while self.fatal is None:
            await asyncio.sleep(min(1.0, self._hang_timeout_s / 4))
            now = time.monotonic()
            for worker in self._all_workers:
                batch = worker.running
                if batch is None:
                    continue
                limit = max(self._hang_timeout_s, 20 * batch.predicted_s)
                running_s = now - worker.running_since
                if running_s > limit:
                    self._declare_fatal(
                        f"runtime {worker.runtime.name} has run one batch for {running_s:.0f} s"
                    )
                    self._fail(batch.items, NotReady(f"the encoder runtime hung: {self.fatal}"))

    def _declare_fatal(self, reason: str) -> None:
        if self.fatal is not None:
            return
        self.fatal = reason
        log.error("the encoder runtimes cannot serve: %s", reason)
        error = NotReady(f"the encoder runtime failed ({reason}); retry on another replica")
        self._fail(self.queue.drain(), error)
        if self._on_fatal is not None:
            self._on_fatal(reason)

    @staticmethod
    def _fail(items: list[QueuedItem[EncodeJob]], error: BaseException) -> None:
        for item in items:
            if not item.payload.future.done():
                item.payload.future.set_exception(error)

    def extend_deadline(self, future: asyncio.Future[EncodedInput], deadline: float) -> None:
        """Push back the deadline of a submitted input that has not run yet."""
        item = self._queued.get(future)
        if item is not None:
            item.deadline = max(item.deadline, deadline)

    def _on_waiter_done(self, item: QueuedItem[EncodeJob], future: asyncio.Future[EncodedInput]) -> None:
        self._queued.pop(future, None)
        if not future.cancelled():
            return
        item.cancelled = True  # a batch already formed skips it too
        if self.queue.discard(item):
            self.metrics.rejections.labels("cancelled").inc()
            # It waited at least this long: without these samples the error would be learned only
            # from the inputs that were fast enough to be served (those that timed out say most).
            self._learn_wait_error(item, time.monotonic())

    def _dispatch(self) -> None:
        while len(self.queue):
            if self._wide is not None and self._wide.assigned:
                break
            worker = min(self._workers, key=lambda w: w.assigned)
            if worker.assigned > (PREFETCH if len(self.queue) < PREFETCH_MIN_QUEUE else 1):
                break
            formation = self.queue.next_batch(time.monotonic(), len(self._workers))
            self._fail_expired(formation.expired)
            batch = formation.batch
            if batch is None:
                self._arm_wait_timer()
                break
            for item in batch.items:
                self.metrics.queue_seconds.observe(batch.formed_at - item.enqueued_at)
                self._learn_wait_error(item, batch.formed_at)
            self.metrics.batch_size.observe(batch.size)
            self.metrics.batch_tokens.observe(batch.padded_tokens)
            self.metrics.padding_ratio.observe(1.0 - batch.real_tokens / batch.padded_tokens)
            if self._verification is not None:
                batch.verify = self._verification.sample(batch, self._rng)
            if (
                self._wide is not None
                and not len(self.queue)
                and all(w.assigned == 0 for w in self._workers)
                and batch.predicted_s >= WIDE_MIN_S
            ):
                worker = self._wide  # alone on an idle machine: give it every core
            worker.assigned += 1
            worker.inbox.put(batch)

    def _fail_expired(self, items: list[QueuedItem[EncodeJob]]) -> None:
        waiting = [item for item in items if not item.payload.future.done()]
        if not waiting:
            return
        now = time.monotonic()
        self.metrics.rejections.labels("expired").inc(len(waiting))
        for item in waiting:
            self._learn_wait_error(item, now)
        self._fail(waiting, DeadlineExceeded("the request's deadline passed while it was queued"))

    def _arm_wait_timer(self) -> None:
        if self._wait_timer is not None or not len(self.queue):
            return
        remaining = self.queue.limits.max_wait_s - self.queue.oldest_wait_s(time.monotonic())
        loop = asyncio.get_running_loop()
        self._wait_timer = loop.call_later(max(remaining, 0.0), self._on_wait_timer)

    def _on_wait_timer(self) -> None:
        self._wait_timer = None
        self._dispatch()

    def _work(self, worker: _Worker) -> None:
        """A runtime's thread: compute each batch of its inbox, hand the result to the loop."""
        assert self._loop is not None
        if self._cpus is not None and worker is not self._wide:
            pin_current_thread(self._cpus[self._workers.index(worker)])
        lower_thread_priority(RUNTIME_NICENESS)
        while (batch := worker.inbox.get()) is not None:
            # What was cancelled or expired since the batch was formed is not computed.
            now = time.monotonic()
            expired = [item for item in batch.items if item.deadline <= now]
            live = [item for item in batch.items if not item.cancelled and item.deadline > now]
            outcome: _BatchOutput | BaseException | None = None
            if live:
                cpu_started = time.thread_time()
                max_len = max(item.length for item in live)
                worker.running_since, worker.running = time.monotonic(), batch
                try:
                    (states, sparsity, kept), seconds = _encode(
                        worker.runtime, [item.payload.ids for item in live], max_len, batch.verify
                    )
                    pooled = masked_mean(states, [item.length for item in live])
                    logits = self._pooled_heads(pooled) if self._pooled_heads is not None else {}
                    outcome = _BatchOutput(states, pooled, logits, seconds, now, sparsity, kept)
                except Exception as exc:  # handed to the loop, which fails the batch
                    outcome = exc
                worker.running = None
                self.metrics.runtime_cpu.inc(time.thread_time() - cpu_started)
            self._loop.call_soon_threadsafe(self._complete, worker, live, expired, outcome)

    def _complete(
        self,
        worker: _Worker,
        items: list[QueuedItem[EncodeJob]],
        expired: list[QueuedItem[EncodeJob]],
        outcome: _BatchOutput | BaseException | None,
    ) -> None:
        worker.assigned -= 1
        self._fail_expired(expired)
        if isinstance(outcome, BaseException):
            self._failures_in_a_row += 1
            log.error("runtime %s failed a batch of %d: %r", worker.runtime.name, len(items), outcome)
            self._fail(items, outcome)
            if self._failures_in_a_row >= self._fatal_after_failures:
                self._declare_fatal(f"{self._failures_in_a_row} batches in a row failed: {outcome!r}")
        elif outcome is not None:
            self._failures_in_a_row = 0
            states, seconds, started = outcome.states, outcome.seconds, outcome.started
            self.metrics.inference_seconds.observe(seconds)
            # The model is of the single-thread runtimes, on batches that only encode.
            if worker is not self._wide and outcome.kept_attention_mass is None:
                max_len = states.shape[1]
                self.metrics.prediction_error.observe(self.latency.observe(len(items), max_len, seconds))
            for row, item in enumerate(items):
                if not item.payload.future.done():
                    item.payload.future.set_result(
                        EncodedInput(
                            states[row, : item.length],
                            outcome.pooled[row],
                            started - item.enqueued_at,
                            seconds,
                            {task: logits[row] for task, logits in outcome.logits.items()},
                            None if outcome.sparsity is None else float(outcome.sparsity[row]),
                            _measured(outcome.kept_attention_mass, row),
                        )
                    )
        self._dispatch()

    def warm_up(self) -> None:
        """Run every runtime over the plan's grid of shapes (blocking) and seed the latency model;
        with `tune_budget`, set the batch budget from the measured throughput.

        The runtimes warm up side by side, as they will serve: the times the latency model
        starts from are those of a machine whose cores are all busy."""
        plan = self._warm_up_plan
        max_tokens = plan.max_tokens or self.queue.limits.max_batch_tokens
        shapes = [
            (size, max_len) for max_len in plan.lengths for size in plan.sizes if size * max_len <= max_tokens
        ]

        def sweep(runtime: EncoderRuntime) -> list[tuple[int, int, float]]:
            measured = []
            for size, max_len in shapes:
                ids = [np.full(max_len, 1000, dtype=np.int64)] * size
                _encode(runtime, ids, max_len)  # the first run of a shape pays for planning
                measured.append((size, max_len, _encode(runtime, ids, max_len)[1]))
            return measured

        with ThreadPoolExecutor(len(self._workers)) as pool:
            sweeps = list(pool.map(sweep, [worker.runtime for worker in self._workers]))
        if self._wide is not None:
            sweep(self._wide.runtime)  # only to plan its shapes; the model is of the narrow ones
        for measured in sweeps:
            for size, max_len, seconds in measured:
                self.latency.observe(size, max_len, seconds)
        self.latency.refit()
        if plan.tune_budget:
            self._set_budget(saturating_budget([m for measured in sweeps for m in measured], plan.saturation))

    def _set_budget(self, tokens: int) -> None:
        limits = self.queue.limits
        longest = max(self._warm_up_plan.lengths)
        tokens = max(tokens, longest)  # one input of the longest length always fits
        self.queue.limits = replace(
            limits,
            max_batch_tokens=tokens,
            max_batch_size=max(limits.max_batch_size, *self._warm_up_plan.sizes),
        )
        log.info(
            "batch budget from the warm-up: %d padded tokens, %d inputs (was %d, %d)",
            tokens, self.queue.limits.max_batch_size, limits.max_batch_tokens, limits.max_batch_size,
        )  # fmt: skip

    async def close(self, timeout_s: float = 30.0) -> None:
        """Stop the worker threads after the batches they hold (a hung one is left behind: the
        threads are daemons, and the process is on its way out)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        for worker in self._all_workers:
            worker.inbox.put(None)
        threads = [worker.thread for worker in self._all_workers if worker.thread is not None]

        def join_all() -> None:
            deadline = time.monotonic() + timeout_s
            for thread in threads:
                thread.join(timeout=max(deadline - time.monotonic(), 0.0))

        await asyncio.get_running_loop().run_in_executor(None, join_all)


def _encode(
    runtime: EncoderRuntime, ids: list[np.ndarray], max_len: int, verify: bool = False
) -> tuple[RuntimeOutput, float]:
    input_ids, attention_mask = pad_batch(ids, max_len)
    started = time.perf_counter()
    output = runtime.encode(input_ids, attention_mask, verify)
    return output, time.perf_counter() - started


def _measured(values: np.ndarray | None, row: int) -> float | None:
    """One input's kept attention mass; negative means not measured (the graph's convention)."""
    if values is None or values[row] < 0:
        return None
    return float(values[row])
