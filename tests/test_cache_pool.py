"""The cache pool against a real redis-server: tiers, MGET batching, TTLs, corruption,
namespaces, bundle versions, and Redis dying and coming back."""

from __future__ import annotations

import asyncio
import itertools
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from engine.cache import codec
from engine.cache.breaker import BreakerState, CircuitBreaker
from engine.cache.keys import CacheKeys
from engine.cache.local import LocalTier
from engine.cache.metrics import CacheMetrics
from engine.cache.pool import CachePool, CacheTtl
from engine.cache.redis_tier import RedisTier
from engine.errors import NotReady
from loadtest.redis_server import RedisServer

_namespaces = itertools.count()


def fresh_namespace() -> str:
    return f"test{next(_namespaces)}-{time.monotonic_ns()}"


def make_pool(
    redis_url: str | None,
    *,
    namespace: str,
    version: str = "v1",
    l1_bytes: int | None = 1 << 20,
    ttl: CacheTtl | None = None,
    breaker: CircuitBreaker | None = None,
) -> tuple[CachePool, CacheMetrics]:
    metrics = CacheMetrics(CollectorRegistry())
    shared = None
    if redis_url is not None:
        shared = RedisTier(redis_url, metrics, timeout_s=0.2, breaker=breaker)
    pool = CachePool(
        CacheKeys(namespace, version),
        metrics,
        local=LocalTier(l1_bytes) if l1_bytes else None,
        shared=shared,
        ttl=ttl,
    )
    return pool, metrics


def count(metrics: CacheMetrics, tier: str, kind: str, result: str) -> float:
    return metrics.lookups.labels(tier, kind, result)._value.get()


def as_bytes(_index: int, value: bytes) -> bytes:
    return value


async def settle(pool: CachePool) -> None:
    """Wait until the Redis writer has sent what was queued."""
    assert pool.shared is not None
    await asyncio.wait_for(pool.shared._writes.join(), timeout=5)


def test_l1_hits_without_redis_and_respects_its_byte_bound() -> None:
    async def run() -> None:
        pool, metrics = make_pool(None, namespace="local", l1_bytes=2000)
        pool.put_many([("a", b"x" * 500), ("b", b"y" * 500)], "result")
        assert await pool.get_many(["a", "b", "c"], "result", as_bytes) == [b"x" * 500, b"y" * 500, None]
        assert count(metrics, "l1", "result", "hit") == 2 and count(metrics, "l1", "result", "miss") == 1
        pool.put_many([(f"k{i}", b"z" * 500) for i in range(4)], "result")  # evicts the oldest
        assert pool.local is not None and pool.local.bytes <= 2000
        assert await pool.get_many(["a"], "result", as_bytes) == [None]
        [exported] = metrics.l1_bytes.collect()
        assert exported.samples[0].value == pool.local.bytes  # the value a scrape reads

    asyncio.run(run())


def test_l2_hits_fill_l1_and_a_batch_is_one_mget(redis_server: RedisServer) -> None:
    async def run() -> None:
        namespace = fresh_namespace()
        writer, _ = make_pool(redis_server.url, namespace=namespace)
        writer.start()
        keys = [writer.keys.result("sentiment:k1", f"text {i}") for i in range(64)]
        writer.put_many([(key, f"value {i}".encode()) for i, key in enumerate(keys)], "result")
        await settle(writer)
        await writer.close()

        reader, metrics = make_pool(redis_server.url, namespace=namespace)  # another replica
        reader.start()
        stats = redis_server.client()
        stats.config_resetstat()
        values = await reader.get_many(keys, "result", as_bytes)
        assert values == [f"value {i}".encode() for i in range(64)]
        commands = stats.info("commandstats")
        assert commands["cmdstat_mget"]["calls"] == 1  # 64 lookups, one round trip
        assert "cmdstat_get" not in commands
        assert count(metrics, "l2", "result", "hit") == 64
        again = await reader.get_many(keys, "result", as_bytes)  # now from L1: no Redis call
        assert again == values
        assert count(metrics, "l1", "result", "hit") == 64
        assert stats.info("commandstats")["cmdstat_mget"]["calls"] == 1
        await reader.close()

    asyncio.run(run())


def test_entries_expire_after_their_ttl(redis_server: RedisServer) -> None:
    async def run() -> None:
        pool, _ = make_pool(redis_server.url, namespace=fresh_namespace(), ttl=CacheTtl(1, 1))
        pool.start()
        pool.put_many([("k", b"v")], "result")
        await settle(pool)
        assert 0 < redis_server.client().ttl(b"k") <= 1
        assert await pool.get_many(["k"], "result", as_bytes) == [b"v"]
        await asyncio.sleep(1.2)
        assert await pool.get_many(["k"], "result", as_bytes) == [None]  # gone from both tiers
        await pool.close()

    asyncio.run(run())


def test_a_corrupted_value_is_a_counted_miss(redis_server: RedisServer) -> None:
    async def run() -> None:
        pool, metrics = make_pool(redis_server.url, namespace=fresh_namespace(), l1_bytes=0)
        key = pool.keys.states(np.array([101, 2023, 102]))
        good = codec.encode_states(np.ones((3, 4), dtype=np.float32))
        for bad in (b"\x80\x04pickle", good[:-2], good[:5] + b"\x09" + good[6:], b""):
            redis_server.client().set(key, bad)
            assert await pool.get_many([key], "states", lambda _i, v: codec.decode_states(v)) == [None]
        assert count(metrics, "l2", "states", "corrupt") == 4
        redis_server.client().set(key, good)
        [states] = await pool.get_many([key], "states", lambda _i, v: codec.decode_states(v))
        assert states is not None and states.shape == (3, 4)
        await pool.close()

    asyncio.run(run())


def test_namespaces_and_bundle_versions_never_read_each_other(redis_server: RedisServer) -> None:
    async def run() -> None:
        shared_namespace = fresh_namespace()
        mine, _ = make_pool(redis_server.url, namespace=shared_namespace, version="v1", l1_bytes=0)
        theirs, _ = make_pool(redis_server.url, namespace=fresh_namespace(), version="v1", l1_bytes=0)
        newer, _ = make_pool(redis_server.url, namespace=shared_namespace, version="v2", l1_bytes=0)
        mine.start()
        ids = np.array([101, 7592, 102])
        mine.put_many([(mine.keys.states(ids), b"mine"), (mine.keys.result("t:p", "text"), b"r")], "states")
        await settle(mine)
        for other in (theirs, newer):
            keys = [other.keys.states(ids), other.keys.result("t:p", "text")]
            assert await other.get_many(keys, "states", as_bytes) == [None, None]
        assert await mine.get_many([mine.keys.states(ids)], "states", as_bytes) == [b"mine"]
        assert await mine.flush() == 2  # the flush removes this namespace's keys only
        assert await mine.get_many([mine.keys.states(ids)], "states", as_bytes) == [None]
        for pool in (mine, theirs, newer):
            await pool.close()

    asyncio.run(run())


def test_redis_killed_is_a_miss_then_the_breaker_skips_it_and_it_comes_back(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from loadtest.server_process import free_port

    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis-fault"))
    server.start()

    async def run() -> None:
        breaker = CircuitBreaker(threshold=2, reset_after_s=0.3)
        pool, metrics = make_pool(server.url, namespace="fault", l1_bytes=0, breaker=breaker)
        pool.start()
        pool.put_many([("k", b"v")], "result")
        await settle(pool)
        assert await pool.get_many(["k"], "result", as_bytes) == [b"v"]

        server.stop()
        started = time.monotonic()
        for _ in range(10):  # every lookup answers (a miss), fast, while Redis is dead
            assert await pool.get_many(["k"], "result", as_bytes) == [None]
        assert time.monotonic() - started < 2.0
        assert breaker.state.name == "OPEN"
        assert metrics.breaker_state._value.get() == BreakerState.OPEN
        assert count(metrics, "l2", "result", "error") == 10
        pool.put_many([("k2", b"v2")], "result")  # a write while it is dead: dropped, not raised
        await settle(pool)
        with pytest.raises(NotReady, match="did not answer the flush"):  # an operator's flush: told
            await pool.flush()

        server.start()  # back, empty (no persistence)
        await asyncio.sleep(0.35)
        assert await pool.get_many(["k"], "result", as_bytes) == [None]  # the probe: a real miss
        assert breaker.state.name == "CLOSED"
        pool.put_many([("k", b"again")], "result")
        await settle(pool)
        assert await pool.get_many(["k"], "result", as_bytes) == [b"again"]
        await pool.close()

    try:
        asyncio.run(run())
    finally:
        server.stop()


def test_the_breaker_opens_after_repeated_failures_and_probes_once() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=3, reset_after_s=5, clock=lambda: now[0])
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state.name == "CLOSED"
    breaker.failure()
    assert breaker.state.name == "OPEN" and not breaker.allow()
    now[0] = 5.0
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.failure()
    assert breaker.state.name == "OPEN"
    now[0] = 10.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state.name == "CLOSED" and breaker.allow()
