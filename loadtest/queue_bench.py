"""`sparsebert bench --suite queue`: queue policies compared in the calibrated simulation.

The benchmark workload's token lengths, the server's default batch limits, and variants of
them, at concurrency 8 and 32 (loadtest/queue_sim.py): what each policy does to the tail,
seeded and repeatable, in about 30 s. These are simulated figures, labelled as such; the
server's own are `sparsebert bench --suite batching`.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

from engine.bundle import load_bundle
from engine.queue import BatchLimits
from engine.tokenization import TextTokenizer
from loadtest.queue_sim import ServiceModel, SimulatedPoint, simulate
from loadtest.workload import load_workload
from server.app import batch_limits
from server.settings import Settings

LEVELS = (8, 32)
SEEDS = (0, 1, 2)
DURATION_S = 60.0


def policies(limits: BatchLimits) -> list[tuple[str, BatchLimits, ServiceModel]]:
    model = ServiceModel()
    return [
        ("server defaults", limits, model),
        ("no size cap while shallow", replace(limits, shallow_max_batch_size=None), model),
        ("by arrival (no compute credit)", replace(limits, compute_credit=0.0), model),
        ("half compute credit", replace(limits, compute_credit=0.5), model),
        ("double compute credit", replace(limits, compute_credit=2.0), model),
        ("batches of one", replace(limits, max_batch_size=1), model),
        ("server defaults, no noise", limits, model.noiseless()),
    ]


def workload_lengths(bundle: Path) -> list[int]:
    manifest = load_bundle(bundle).manifest
    tokenizer = TextTokenizer(bundle / manifest.tokenizer, manifest.max_length)
    return [encoded.length for encoded in tokenizer.encode_ids_batch(load_workload())]


def run(bundle: Path) -> None:
    lengths = workload_lengths(bundle)
    limits = batch_limits(Settings(), load_bundle(bundle).manifest, "onnxruntime-cpu")
    print(
        f"\nqueue policies, simulated (loadtest/queue_sim.py): {len(lengths)} texts, "
        f"{DURATION_S:g} s per point, seeds {', '.join(map(str, SEEDS))}; mean over seeds [range]"
    )
    print("\n| policy | concurrency | req/s | p50 ms | p99 ms | p99/p50 | longest queue wait ms |")
    print("|---|---|---|---|---|---|---|")
    for name, variant, model in policies(limits):
        for level in LEVELS:
            points = [
                simulate(lengths, level, limits=variant, model=model, duration_s=DURATION_S, seed=seed)
                for seed in SEEDS
            ]
            print(_row(name, level, points), flush=True)


def _row(name: str, level: int, points: list[SimulatedPoint]) -> str:
    ratios = [point.tail_ratio for point in points]

    def mean_ms(values: list[float]) -> str:
        return f"{1000 * statistics.fmean(values):.1f}"

    return (
        f"| {name} | {level} | {statistics.fmean(p.throughput for p in points):.0f} "
        f"| {mean_ms([p.p50_s for p in points])} | {mean_ms([p.p99_s for p in points])} "
        f"| {statistics.fmean(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}] "
        f"| {1000 * max(p.max_queue_s for p in points):.0f} |"
    )
