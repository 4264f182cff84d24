"""Drives the queue: forms a batch whenever a runtime is free and runs it on a worker thread.

Event-driven on the asyncio loop (no polling): a batch is formed when an input arrives or a
runtime finishes. Runtimes run in their own threads; ONNX Runtime releases the GIL while it
computes, so the loop stays free for I/O.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from engine.cost_model import LatencyModel
from engine.errors import DeadlineExceeded
from engine.metrics import EngineMetrics
from engine.queue import Batch, BatchLimits, BatchQueue, QueuedItem
from engine.runtime.base import EncoderRuntime, pad_batch


@dataclass(slots=True)
class EncodeJob:
    ids: np.ndarray
    future: asyncio.Future[np.ndarray]


class Batcher:
    def __init__(
        self,
        runtimes: list[EncoderRuntime],
        limits: BatchLimits,
        metrics: EngineMetrics,
        latency: LatencyModel | None = None,
    ) -> None:
        if not runtimes:
            raise ValueError("the batcher needs at least one runtime")
        self.latency = latency or LatencyModel()
        self.queue: BatchQueue[EncodeJob] = BatchQueue(limits, self.latency)
        self.metrics = metrics
        self._idle = list(runtimes)
        self._runtime_count = len(runtimes)
        self._executor = ThreadPoolExecutor(len(runtimes), thread_name_prefix="runtime")
        self._wait_timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Future[None]] = set()
        self.failure: BaseException | None = None

    @property
    def runtimes(self) -> int:
        return self._runtime_count

    def estimated_wait_s(self) -> float:
        return self.queue.drain_estimate_s(self._runtime_count)

    def submit(self, ids: np.ndarray, deadline: float) -> asyncio.Future[np.ndarray]:
        """Queue one tokenized input; raises Overloaded if the queue is full."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        item = QueuedItem(
            length=int(ids.shape[0]),
            enqueued_at=time.monotonic(),
            deadline=deadline,
            payload=EncodeJob(ids, future),
        )
        self.queue.put(item)
        future.add_done_callback(lambda f: self._on_waiter_done(item, f))
        self._update_gauges()
        self._dispatch()
        return future

    def _on_waiter_done(self, item: QueuedItem[EncodeJob], future: asyncio.Future[np.ndarray]) -> None:
        if future.cancelled() and self.queue.discard(item):
            self.metrics.rejections.labels("cancelled").inc()
            self._update_gauges()

    def _dispatch(self) -> None:
        while self._idle and len(self.queue):
            formation = self.queue.next_batch(time.monotonic())
            for item in formation.expired:
                self.metrics.rejections.labels("deadline").inc()
                if not item.payload.future.done():
                    item.payload.future.set_exception(
                        DeadlineExceeded("the request's deadline passed while it was queued")
                    )
            batch = formation.batch
            if batch is None:
                self._arm_wait_timer()
                break
            runtime = self._idle.pop()
            task = asyncio.ensure_future(self._run(runtime, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        self._update_gauges()

    def _arm_wait_timer(self) -> None:
        if self._wait_timer is not None or not len(self.queue):
            return
        remaining = self.queue.limits.max_wait_s - self.queue.oldest_wait_s(time.monotonic())
        loop = asyncio.get_running_loop()
        self._wait_timer = loop.call_later(max(remaining, 0.0), self._on_wait_timer)

    def _on_wait_timer(self) -> None:
        self._wait_timer = None
        self._dispatch()

    async def _run(self, runtime: EncoderRuntime, batch: Batch[EncodeJob]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        for item in batch.items:
            self.metrics.queue_seconds.observe(started - item.enqueued_at)
        self.metrics.batch_size.observe(batch.size)
        self.metrics.batch_tokens.observe(batch.padded_tokens)
        self.metrics.padding_ratio.observe(1.0 - batch.real_tokens / batch.padded_tokens)
        try:
            states, seconds = await loop.run_in_executor(
                self._executor, _encode, runtime, [item.payload.ids for item in batch.items], batch.max_len
            )
        except Exception as exc:
            self.failure = exc
            for item in batch.items:
                if not item.payload.future.done():
                    item.payload.future.set_exception(exc)
        else:
            self.metrics.inference_seconds.observe(seconds)
            error = self.latency.observe(batch.size, batch.max_len, seconds)
            self.metrics.prediction_error.observe(error)
            for row, item in enumerate(batch.items):
                if not item.payload.future.done():
                    item.payload.future.set_result(states[row, : item.length])
        finally:
            self._idle.append(runtime)
            self._dispatch()

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self.queue))
        self.metrics.queue_tokens.set(self.queue.queued_tokens)
        self.metrics.busy_runtimes.set(self._runtime_count - len(self._idle))

    def warm_up(
        self, lengths: tuple[int, ...] = (8, 32, 128, 512), sizes: tuple[int, ...] = (1, 4, 16)
    ) -> None:
        """Run every runtime over a grid of shapes (blocking) and seed the latency model."""
        for runtime in self._idle:
            for max_len in lengths:
                for size in sizes:
                    if size * max_len > self.queue.limits.max_batch_tokens:
                        continue
                    ids = [np.full(max_len, 1000, dtype=np.int64)] * size
                    _encode(runtime, ids, max_len)  # the first run of a shape pays for planning
                    _, seconds = _encode(runtime, ids, max_len)
                    self.latency.observe(size, max_len, seconds)
        self.latency.refit()

    async def close(self) -> None:
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._executor.shutdown(wait=True)


def _encode(runtime: EncoderRuntime, ids: list[np.ndarray], max_len: int) -> tuple[np.ndarray, float]:
    input_ids, attention_mask = pad_batch(ids, max_len)
    started = time.perf_counter()
    states = runtime.encode(input_ids, attention_mask)
    return states, time.perf_counter() - started
