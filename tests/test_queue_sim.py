"""The queue simulation (loadtest/queue_sim.py) and, through it, the queue's tail policies.

The simulation drives the server's own BatchQueue, so these tests guard the policies as well:
an edit that loses the compute credit or the shallow-queue size cap shows up here as a looser
simulated tail. Seeded, and 30 simulated seconds a point (under a second of wall time each)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from engine.bundle import load_bundle
from engine.queue import BatchLimits
from loadtest.queue_bench import workload_lengths
from loadtest.queue_sim import ServiceModel, SimulatedPoint, simulate
from server.app import batch_limits
from server.settings import Settings


@pytest.fixture(scope="module")
def lengths(bundle_dir: Path) -> list[int]:
    return workload_lengths(bundle_dir)


@pytest.fixture(scope="module")
def limits(bundle_dir: Path) -> BatchLimits:
    return batch_limits(Settings(), load_bundle(bundle_dir).manifest, "onnxruntime-cpu")


def point(lengths: list[int], concurrency: int, limits: BatchLimits, seed: int = 0) -> SimulatedPoint:
    return simulate(lengths, concurrency, limits=limits, duration_s=30.0, seed=seed)


def test_the_shallow_queue_cap_is_a_cpu_default(bundle_dir: Path, limits: BatchLimits) -> None:
    assert limits.shallow_max_batch_size == Settings().shallow_batch_size == 2
    manifest = load_bundle(bundle_dir).manifest
    assert batch_limits(Settings(), manifest, "onnxruntime-cuda").shallow_max_batch_size is None
    switched_off = batch_limits(Settings(shallow_batch_size=0), manifest, "onnxruntime-cpu")
    assert switched_off.shallow_max_batch_size is None


def test_closed_loop_clients_obey_littles_law(lengths: list[int], limits: BatchLimits) -> None:
    """Each client always has one request in the system: throughput x mean latency = clients."""
    for concurrency in (1, 8, 32):
        simulated = point(lengths, concurrency, limits)
        assert simulated.throughput * simulated.mean_s == pytest.approx(concurrency, rel=0.02)


def test_more_clients_raise_throughput_until_the_runtimes_saturate(
    lengths: list[int], limits: BatchLimits
) -> None:
    one, eight, many = (point(lengths, c, limits).throughput for c in (1, 8, 32))
    assert eight > 1.6 * one  # two runtimes, and batches
    assert many == pytest.approx(eight, rel=0.25)


def test_the_compute_credit_tightens_the_tail_at_8(lengths: list[int], limits: BatchLimits) -> None:
    credited = [point(lengths, 8, limits, seed).tail_ratio for seed in (0, 1)]
    by_arrival = [point(lengths, 8, replace(limits, compute_credit=0.0), seed).tail_ratio for seed in (0, 1)]
    assert max(credited) < min(by_arrival) - 0.15


def test_the_shallow_queue_cap_tightens_the_tail_at_8_and_leaves_32_alone(
    lengths: list[int], limits: BatchLimits
) -> None:
    uncapped = replace(limits, shallow_max_batch_size=None)
    capped_8, uncapped_8 = point(lengths, 8, limits), point(lengths, 8, uncapped)
    assert capped_8.tail_ratio < uncapped_8.tail_ratio - 0.1
    assert capped_8.p99_s < uncapped_8.p99_s
    capped_32, uncapped_32 = point(lengths, 32, limits), point(lengths, 32, uncapped)
    assert capped_32.throughput == pytest.approx(uncapped_32.throughput, rel=0.02)


def test_no_input_starves(lengths: list[int], limits: BatchLimits) -> None:
    """At 32 clients the longest any input waits stays within 2.5x the mean latency; ranking
    long inputs last (a negative credit) starves them, and this bound catches it."""
    served = point(lengths, 32, limits)
    assert served.max_queue_s < 2.5 * served.mean_s
    starving = point(lengths, 32, replace(limits, compute_credit=-20.0))
    assert starving.max_queue_s > 2.5 * starving.mean_s


def test_a_noiseless_model_is_deterministic(lengths: list[int], limits: BatchLimits) -> None:
    model = ServiceModel().noiseless()
    first, second = (
        simulate(lengths, 8, limits=limits, model=model, duration_s=10.0, seed=seed) for seed in (0, 1)
    )
    assert first == second


def test_a_held_batch_is_released_when_its_wait_runs_out(lengths: list[int], limits: BatchLimits) -> None:
    """With max_wait_s a lone input is held for company; at concurrency 1 none comes, so every
    request pays the wait, and no more."""
    waiting = replace(limits, max_wait_s=0.005)
    held, free = point(lengths, 1, waiting), point(lengths, 1, limits)
    assert held.mean_s == pytest.approx(free.mean_s + 0.005, rel=0.05)
