"""`sparsebert bench --suite cache`: the cache pool on a workload with repeats, in one run.

The workload: a fixed sequence of classify requests in which half are new texts and half repeat
an earlier one, picked Zipf-like by popularity (rank r with weight 1/r^1.1), the shape of real
traffic (a few texts asked for very often, a long tail asked twice). Texts are drawn, seeded,
from the packaged BBC News corpus. The sequence is played closed-loop at a fixed concurrency.

This machine's speed drifts by 10-20% over minutes, so each cached run is compared with cache-off
runs on the same server process, interleaved: off, cached, off, cached. "Off" sends every
request with `Cache-Control: no-store` (no lookup, no write); the admin flush empties the cache
before each cached run. Coalescing is off in both (`--no-coalesce`): this measures the cache.

- L1: the embedded default (in-process tier only);
- L1+L2: with a local redis-server (another process on the same 2 cores);
- L1+L2 with Redis killed (SIGKILL) a third of the way through and restarted at two thirds.

Then, at concurrency 1, the end-to-end latency over HTTP of an L1 hit (a text this replica
served), an L2 hit (a second replica, its L1 empty, sharing the Redis) and a miss.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtest.closed_loop import LoadResult, closed_loop, run_on_uvloop
from loadtest.redis_server import RedisServer
from loadtest.server_process import free_port, start_server, stop_server
from loadtest.workload import generate

NO_STORE = {"Cache-Control": "no-store"}
ROUNDS = 2


def repeat_workload(requests: int, repeat_share: float = 0.5, seed: int = 11) -> list[str]:
    """`requests` texts, `repeat_share` of them repeats of earlier ones (Zipf by first appearance)."""
    rng = random.Random(seed)
    fresh = list(dict.fromkeys(generate(count=int(requests * (1 - repeat_share) * 1.1) + 10, seed=seed)))
    seen: list[str] = []
    weights: list[float] = []
    sequence: list[str] = []
    for _ in range(requests):
        if not seen or rng.random() >= repeat_share:
            seen.append(fresh[len(seen)])
            weights.append(1.0 / len(seen) ** 1.1)
            sequence.append(seen[-1])
        else:
            sequence.append(rng.choices(seen, weights)[0])
    return sequence


def run(bundle: Path, port: int, requests: int, concurrency: int) -> int:
    sequence = repeat_workload(requests)
    repeats = len(sequence) - len(set(sequence))
    print(
        f"cache workload: {len(sequence)} requests, {repeats / len(sequence):.0%} repeats "
        f"({len(set(sequence))} distinct texts, Zipf 1.1), concurrency {concurrency}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as workdir:
        redis = RedisServer(free_port(), Path(workdir))
        redis.start()
        try:
            pairs = _interleaved(bundle, port, sequence, concurrency, "L1", ())
            pairs += _interleaved(
                bundle, port, sequence, concurrency, "L1+L2", ("--cache-redis-url", redis.url), redis
            )
            hits = _hit_latencies(bundle, port, sequence, redis)
        finally:
            redis.stop()

    print("\n| setup | runs | requests each | errors | req/s | p50 ms | p99 ms | / cache off (same server) |")
    print("|---|---|---|---|---|---|---|---|")
    for setup, off, cached in pairs:
        for name, runs in ((f"{setup}: cache off", off), (setup, cached)):
            print(
                f"| {name} | {len(runs)} | {runs[0].requests} | {sum(r.errors for r in runs)} "
                f"| {_mean(r.rps for r in runs)} | {_mean(r.p50_ms for r in runs)} "
                f"| {_mean(r.p99_ms for r in runs)} "
                f"| {_mean(r.rps for r in runs) / _mean(r.rps for r in off):.2f}x |"
            )
    print("\n| end to end over HTTP, concurrency 1 | p50 ms | p99 ms |")
    print("|---|---|---|")
    for name, (p50, p99) in hits.items():
        print(f"| {name} | {p50} | {p99} |")
    return 0


def _mean(values: object) -> float:
    return round(statistics.fmean(values), 1)  # type: ignore[arg-type]


def _interleaved(
    bundle: Path,
    port: int,
    sequence: list[str],
    concurrency: int,
    setup: str,
    flags: tuple[str, ...],
    redis: RedisServer | None = None,
) -> list[tuple[str, list[LoadResult], list[LoadResult]]]:
    process = start_server(bundle, port, ("--no-coalesce", "--admin-api", *flags))
    flush = f"http://127.0.0.1:{port}/admin/cache/flush"
    try:
        run_on_uvloop(
            closed_loop(port, [f"warm-up text {i}" for i in range(64)], 4, "warm", headers=NO_STORE)
        )
        off: list[LoadResult] = []
        cached: list[LoadResult] = []
        for _ in range(ROUNDS):
            off.append(
                _report(run_on_uvloop(closed_loop(port, sequence, concurrency, "off", headers=NO_STORE)))
            )
            httpx.post(flush).raise_for_status()
            before = _result_lookups(port)
            cached.append(_report(run_on_uvloop(closed_loop(port, sequence, concurrency, setup))))
            _report_hits(before, _result_lookups(port))
        pairs = [(setup, off, cached)]
        if redis is not None:
            httpx.post(flush).raise_for_status()
            progress = [0]
            chaos = _kill_redis_midway(redis, progress, len(sequence))
            killed = run_on_uvloop(
                closed_loop(port, sequence, concurrency, "Redis killed", progress=progress)
            )
            chaos.join()
            pairs.append((f"{setup}, Redis killed midway", off, [_report(killed)]))
        return pairs
    finally:
        stop_server(process)


def _report(result: LoadResult) -> LoadResult:
    print(f"  {result.setup:14} {result.rps:7.1f} req/s  p50 {result.p50_ms:6.1f} ms  "
          f"p99 {result.p99_ms:6.1f} ms  errors {result.errors}", flush=True)  # fmt: skip
    return result


def _result_lookups(port: int) -> dict[tuple[str, str], float]:
    """(tier, result) -> result-cache lookups so far, and coalesced inputs under ("coalesced", "")."""
    counts: dict[tuple[str, str], float] = {}
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sparsebert_cache_lookups_total" and sample.labels["kind"] == "result":
                counts[(sample.labels["tier"], sample.labels["result"])] = sample.value
            elif sample.name == "sparsebert_coalesced_inputs_total":
                counts[("coalesced", "")] = sample.value
    return counts


def _report_hits(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> None:
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    l1 = sum(value for (tier, _), value in delta.items() if tier == "l1")
    hits = {tier: delta.get((tier, "hit"), 0.0) for tier in ("l1", "l2")}
    print(
        f"  {'':14} result lookups {l1:.0f}: L1 hits {hits['l1']:.0f} ({hits['l1'] / max(l1, 1):.1%}), "
        f"L2 hits {hits['l2']:.0f}, coalesced {delta.get(('coalesced', ''), 0.0):.0f}",
        flush=True,
    )


def _kill_redis_midway(redis: RedisServer, progress: list[int], requests: int) -> threading.Thread:
    """Kill Redis a third of the way through the requests and bring it back, empty, at two
    thirds; from a thread, so the load never pauses."""

    def wait_for(share: float) -> None:
        while progress[0] < requests * share:
            time.sleep(0.01)

    def chaos() -> None:
        wait_for(1 / 3)
        redis.stop()
        wait_for(2 / 3)
        redis.start()

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    return thread


def _one_by_one(port: int, texts: list[str]) -> tuple[float, float]:
    """p50 and p99 in ms of `texts` sent one at a time."""
    result = run_on_uvloop(closed_loop(port, texts, 1, "latency"))
    return result.p50_ms, result.p99_ms


def _hit_latencies(
    bundle: Path, port: int, sequence: list[str], redis: RedisServer
) -> dict[str, tuple[float, float]]:
    redis_flags = ("--cache-redis-url", redis.url)
    cached = list(dict.fromkeys(sequence))[:300]
    misses = [f"{text} (never seen before)" for text in cached[:100]]
    first = start_server(bundle, port, redis_flags)
    try:
        _one_by_one(port, cached)  # computed here, written to both tiers
        time.sleep(0.5)
        hits = {"L1 hit": _one_by_one(port, cached)}
    finally:
        stop_server(first)
    second_port = free_port()
    second = start_server(bundle, second_port, redis_flags)  # another replica, its L1 empty
    try:
        hits["L2 hit (another replica)"] = _one_by_one(second_port, cached)
        hits["miss (computed)"] = _one_by_one(second_port, misses)
    finally:
        stop_server(second)
    return hits
