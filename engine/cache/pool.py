"""The cache pool: one interface over L1 (in process) and L2 (Redis), both optional.

A lookup of a batch of keys reads L1, then asks L2 for what L1 lacked in one MGET, and fills L1
with L2's hits. A write goes to L1 at once and to L2 through its writer queue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from engine.cache.codec import DecodeError
from engine.cache.keys import CacheKeys
from engine.cache.local import LocalTier
from engine.cache.metrics import CacheMetrics
from engine.cache.redis_tier import RedisTier

T = TypeVar("T")
Kind = Literal["result", "states"]


@dataclass(frozen=True)
class CacheTtl:
    result_s: int = 3600
    states_s: int = 600

    def of(self, kind: Kind) -> int:
        return self.result_s if kind == "result" else self.states_s


class CachePool:
    def __init__(
        self,
        keys: CacheKeys,
        metrics: CacheMetrics,
        *,
        local: LocalTier | None,
        shared: RedisTier | None,
        ttl: CacheTtl | None = None,
    ) -> None:
        self.keys = keys
        self.metrics = metrics
        self.local = local
        self.shared = shared
        self.ttl = ttl or CacheTtl()
        if local is not None:  # read when scraped
            metrics.l1_bytes.set_function(lambda: local.bytes)
            metrics.l1_entries.set_function(lambda: len(local))
        for tier in (("l1",) if local is not None else ()) + (("l2",) if shared is not None else ()):
            for kind in ("result", "states"):
                for result in ("hit", "miss", "corrupt", "error"):
                    metrics.lookups.labels(tier, kind, result)

    def start(self) -> None:
        if self.shared is not None:
            self.shared.start()

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()

    async def get_many(
        self, keys: Sequence[str], kind: Kind, decode: Callable[[int, bytes], T]
    ) -> list[T | None]:
        """The decoded value of each key, or None. `decode(index, value)` raises DecodeError for a
        value it does not accept: that entry is a miss, counted as corrupt and dropped from L1."""
        found: list[T | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        if self.local is not None:
            missing = []
            for index, key in enumerate(keys):
                value = self.local.get(key)
                found[index] = self._decode(index, value, decode, "l1", kind)
                if found[index] is None:
                    missing.append(index)
                    if value is not None:
                        self.local.discard(key)
        if self.shared is not None and missing:
            values = await self.shared.get_many([keys[i] for i in missing])
            if values is None:
                self.metrics.lookups.labels("l2", kind, "error").inc(len(missing))
            else:
                for index, value in zip(missing, values, strict=True):
                    found[index] = self._decode(index, value, decode, "l2", kind)
                    if found[index] is not None and value is not None and self.local is not None:
                        self.local.put(keys[index], value, self.ttl.of(kind))
        return found

    def _decode(
        self, index: int, value: bytes | None, decode: Callable[[int, bytes], T], tier: str, kind: Kind
    ) -> T | None:
        if value is None:
            self.metrics.lookups.labels(tier, kind, "miss").inc()
            return None
        try:
            decoded = decode(index, value)
        except DecodeError:
            self.metrics.lookups.labels(tier, kind, "corrupt").inc()
            return None
        self.metrics.lookups.labels(tier, kind, "hit").inc()
        return decoded

    def put_many(self, items: Sequence[tuple[str, bytes]], kind: Kind) -> None:
        ttl = self.ttl.of(kind)
        if self.local is not None:
            for key, value in items:
                self.local.put(key, value, ttl)
            self.metrics.writes.labels("l1", "ok").inc(len(items))
        if self.shared is not None:
            self.shared.put_many([(key, value, ttl) for key, value in items])

    async def flush(self) -> int:
        """Empty L1 and delete this namespace's keys from Redis; the number deleted there."""
        if self.local is not None:
            self.local.clear()
        return 0 if self.shared is None else await self.shared.flush(self.keys.pattern)
