"""The batcher with a fake runtime: routing of rows, cancellation, deadlines, failures."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from engine.batcher import GPU_WARM_UP, AttentionVerification, Batcher, saturating_budget
from engine.errors import DeadlineExceeded, NotReady
from engine.metrics import EngineMetrics
from engine.queue import BatchLimits
from engine.runtime.base import RuntimeOutput


class FakeRuntime:
    """Echoes each token id into its state, so every row can be checked; records batch shapes."""

    name = "fake"

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.shapes: list[tuple[int, int]] = []
        self.seen_ids: list[int] = []
        self.spans: list[tuple[float, float]] = []
        self.verified: list[bool] = []
        self.gate = threading.Event()
        self.gate.set()

    def encode(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, verify: bool = False
    ) -> RuntimeOutput:
        self.gate.wait(5)
        started = time.monotonic()
        self.shapes.append(input_ids.shape)
        self.seen_ids.extend(int(row[0]) for row in input_ids)
        time.sleep(self.delay_s)
        self.spans.append((started, time.monotonic()))
        self.verified.append(verify)
        if self.fail:
            raise RuntimeError("engine on fire")
        states = (input_ids[:, :, None] * attention_mask[:, :, None]).astype(np.float32)
        kept = np.full(len(input_ids), 0.9 if verify else -1.0, dtype=np.float32)  # the graph's convention
        return RuntimeOutput(states, kept_attention_mass=kept)


def make_batcher(
    *runtimes: FakeRuntime,
    wide: FakeRuntime | None = None,
    verification: AttentionVerification | None = None,
    **limits: float,
) -> Batcher:
    return Batcher(
        list(runtimes),
        BatchLimits(**limits),  # type: ignore[arg-type]
        EngineMetrics(CollectorRegistry()),
        wide=wide,
        verification=verification,
    )


def ids(first: int, length: int) -> np.ndarray:
    return np.arange(first, first + length, dtype=np.int64)


def test_each_input_gets_its_own_unpadded_rows() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime(delay_s=0.01)
        batcher = make_batcher(runtime)
        deadline = time.monotonic() + 10
        inputs = [ids(100 * i + 1, length) for i, length in enumerate([5, 30, 7, 6, 28])]
        futures = [batcher.submit(x, deadline) for x in inputs]
        outputs = await asyncio.gather(*futures)
        for x, output in zip(inputs, outputs, strict=True):
            assert output.states.shape == (len(x), 1)
            np.testing.assert_array_equal(output.states[:, 0], x)
            assert output.queue_s >= 0 and output.inference_s >= 0.01
        # The first input ran alone (the runtime was idle); the rest grouped by length.
        assert runtime.shapes[0] == (1, 5)
        assert sum(shape[0] for shape in runtime.shapes) == 5
        await batcher.close()

    asyncio.run(scenario())


def test_inputs_cancelled_before_compute_are_never_computed() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        runtime.gate.clear()  # hold the first batch so the others queue up
        batcher = make_batcher(runtime)
        deadline = time.monotonic() + 10
        first = batcher.submit(ids(1, 4), deadline)
        await asyncio.sleep(0.05)
        doomed = batcher.submit(ids(500, 4), deadline)
        kept = batcher.submit(ids(900, 4), deadline)
        doomed.cancel()
        await asyncio.sleep(0)  # done-callbacks run on the next loop iteration
        assert len(batcher.queue) == 1
        runtime.gate.set()
        await asyncio.gather(first, kept)
        assert 500 not in runtime.seen_ids and 900 in runtime.seen_ids
        await batcher.close()

    asyncio.run(scenario())


def test_inputs_past_their_deadline_fail_without_compute() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        runtime.gate.clear()
        batcher = make_batcher(runtime)
        first = batcher.submit(ids(1, 4), time.monotonic() + 10)
        await asyncio.sleep(0.05)
        late = batcher.submit(ids(700, 4), time.monotonic() + 0.01)
        await asyncio.sleep(0.05)
        runtime.gate.set()
        await first
        with pytest.raises(DeadlineExceeded):
            await late
        assert 700 not in runtime.seen_ids
        await batcher.close()

    asyncio.run(scenario())


def test_a_runtime_that_keeps_failing_is_declared_dead_and_nothing_waits_on_it() -> None:
    async def scenario() -> None:
        reasons: list[str] = []
        runtime = FakeRuntime(fail=True)
        batcher = Batcher(
            [runtime], BatchLimits(), EngineMetrics(CollectorRegistry()), on_fatal=reasons.append,
            fatal_after_failures=3,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        for attempt in range(3):
            with pytest.raises(RuntimeError, match="on fire"):
                await batcher.submit(ids(attempt + 1, 4), deadline)
            assert (batcher.fatal is None) == (attempt < 2)
        assert len(reasons) == 1 and "3 batches in a row failed" in reasons[0]
        with pytest.raises(NotReady):
            batcher.submit(ids(9, 4), deadline)
        await batcher.close()

    asyncio.run(scenario())


def test_a_hung_runtime_fails_its_batch_and_the_queue_instead_of_hanging_them() -> None:
    async def scenario() -> None:
        reasons: list[str] = []
        runtime = FakeRuntime()
        runtime.gate.clear()  # the runtime blocks inside encode()
        batcher = Batcher(
            [runtime], BatchLimits(), EngineMetrics(CollectorRegistry()), on_fatal=reasons.append,
            hang_timeout_s=0.4,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        running = batcher.submit(ids(1, 4), deadline)
        await asyncio.sleep(0.05)
        queued = batcher.submit(ids(2, 4), deadline)
        started = time.monotonic()
        for future in (running, queued):
            with pytest.raises(NotReady):
                await asyncio.wait_for(future, timeout=5)
        assert time.monotonic() - started < 2.0
        assert len(reasons) == 1 and "has run one batch" in reasons[0]
        runtime.gate.set()
        await batcher.close()

    asyncio.run(scenario())


def test_two_runtimes_run_batches_side_by_side() -> None:
    async def scenario() -> None:
        runtimes = [FakeRuntime(delay_s=0.1), FakeRuntime(delay_s=0.1)]
        batcher = make_batcher(*runtimes, max_batch_size=1)
        deadline = time.monotonic() + 10
        await asyncio.gather(*(batcher.submit(ids(i * 10 + 1, 4), deadline) for i in range(4)))
        assert all(len(r.shapes) == 2 for r in runtimes)
        (a_start, a_end), (b_start, b_end) = runtimes[0].spans[0], runtimes[1].spans[0]
        assert a_start < b_end and b_start < a_end  # their first batches overlapped in time
        await batcher.close()

    asyncio.run(scenario())


def test_a_lone_long_batch_on_an_idle_machine_runs_wide() -> None:
    async def scenario() -> None:
        narrow, wide = FakeRuntime(delay_s=0.05), FakeRuntime()
        narrow.gate.clear()
        batcher = make_batcher(narrow, FakeRuntime(delay_s=0.05), wide=wide)
        deadline = time.monotonic() + 10
        # Nothing runs, nothing waits: a batch the model predicts long goes to the wide runtime.
        await batcher.submit(ids(1, 400), deadline)
        assert wide.shapes == [(1, 400)]
        # With a narrow runtime busy, the next long input stays narrow.
        busy = batcher.submit(ids(1, 8), deadline)
        await asyncio.sleep(0.02)
        other = batcher.submit(ids(500, 400), deadline)
        narrow.gate.set()
        await asyncio.gather(busy, other)
        assert wide.shapes == [(1, 400)]
        await batcher.close()

    asyncio.run(scenario())


def test_pooled_states_are_each_inputs_own_mean_without_padding() -> None:
    from engine.tasks.heads import masked_mean

    states = np.random.default_rng(0).normal(size=(3, 5, 4)).astype(np.float32)
    pooled = masked_mean(states, [5, 2, 1])
    # float32 like the states (and like a cached input's own mean): a float64 mean made every
    # classification head run in float64, its weights cast on each call (3.5x the time).
    assert pooled.dtype == np.float32
    for row, length in enumerate([5, 2, 1]):
        np.testing.assert_allclose(pooled[row], states[row, :length].mean(0), rtol=1e-5)


@pytest.mark.parametrize("rate", [1.0, 0.0])
def test_sampled_batches_past_the_dense_limit_verify_and_others_do_not(rate: float) -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        batcher = make_batcher(runtime, verification=AttentionVerification(rate, above_tokens=20))
        deadline = time.monotonic() + 10
        short = await batcher.submit(ids(1, 20), deadline)
        long = await batcher.submit(ids(1, 21), deadline)
        assert runtime.verified == [False, rate == 1.0]
        assert short.kept_attention_mass is None
        assert long.kept_attention_mass == (pytest.approx(0.9) if rate == 1.0 else None)
        await batcher.close()

    asyncio.run(scenario())


def test_the_budget_is_where_measured_throughput_stops_growing() -> None:
    # (size, length, seconds): a CPU-like curve, whose tokens/s peaks at a modest batch ...
    cpu = [(1, 128, 0.010), (4, 128, 0.040), (16, 128, 0.200), (4, 512, 0.260)]
    assert saturating_budget(cpu, 0.9) == 128
    # ... and a GPU-like one, where a launch costs most and tokens are nearly free.
    gpu = [(1, 128, 0.004), (8, 128, 0.0045), (32, 128, 0.006), (128, 128, 0.012), (32, 512, 0.013)]
    assert saturating_budget(gpu, 0.9) == 16384
    assert saturating_budget(gpu, 0.5) == 4096


class LaunchBoundRuntime(FakeRuntime):
    """A GPU's shape of cost: a fixed launch time, then a small cost per padded token."""

    def encode(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, verify: bool = False
    ) -> RuntimeOutput:
        time.sleep(0.004 + input_ids.size * 0.2e-6)
        return super().encode(input_ids, attention_mask, verify)


def test_a_gpu_warm_up_sets_the_batch_budget_from_its_measurements() -> None:
    batcher = Batcher(
        [LaunchBoundRuntime()], BatchLimits(), EngineMetrics(CollectorRegistry()), warm_up=GPU_WARM_UP
    )
    batcher.warm_up()
    assert batcher.queue.limits.max_batch_tokens == 16384  # 128 x 128 and 32 x 512: the biggest tried
    assert batcher.queue.limits.max_batch_size == 128
    cpu = make_batcher(LaunchBoundRuntime())  # the default plan keeps the settings' budget
    cpu.warm_up()
    assert (cpu.queue.limits.max_batch_tokens, cpu.queue.limits.max_batch_size) == (8192, 32)
