"""L1: an in-process LRU bounded in bytes, with a TTL per entry (cachetools' TLRUCache)."""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import TLRUCache


class LocalTier:
    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._cache: TLRUCache[str, tuple[bytes, float]] = TLRUCache(
            maxsize=max_bytes,
            ttu=lambda _key, value, now: now + value[1],
            timer=clock,
            getsizeof=lambda value: len(value[0]) + 64,  # + the key and bookkeeping, roughly
        )

    def get(self, key: str) -> bytes | None:
        entry = self._cache.get(key)
        return None if entry is None else entry[0]

    def put(self, key: str, value: bytes, ttl_s: float) -> None:
        if len(value) + 64 <= self._cache.maxsize:
            self._cache[key] = (value, ttl_s)

    def discard(self, key: str) -> None:
        self._cache.pop(key, None)

    def clear(self) -> None:
        self._cache.clear()

    @property
    def bytes(self) -> int:
        return int(self._cache.currsize)

    def __len__(self) -> int:
        return len(self._cache)
