"""The request queue and batch formation: plain state, no threads, no event loop, no model.

Batch formation, each time a runtime is free:
1. drop entries that were cancelled or whose deadline has passed (they are never computed);
2. anchor the batch on the oldest entry, so no input waits behind an endless stream of others
   (a long input cannot starve);
3. grow the batch with the entries nearest in length to the anchor while the latency model says
   each one pays its way: it joins if the batch's predicted time grows by no more than the
   candidate would cost in an equally large batch of inputs of its own length. The token budget
   (a padded batch costs n x max_len) and the size cap bound it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from engine.cost_model import LatencyModel
from engine.errors import Overloaded

T = TypeVar("T")


@dataclass(eq=False, slots=True)
class QueuedItem(Generic[T]):
    length: int
    enqueued_at: float
    deadline: float
    payload: T
    cancelled: bool = False


@dataclass(slots=True)
class Batch(Generic[T]):
    items: list[QueuedItem[T]]
    max_len: int
    formed_at: float
    predicted_s: float

    @property
    def size(self) -> int:
        return len(self.items)

    @property
    def padded_tokens(self) -> int:
        return self.size * self.max_len

    @property
    def real_tokens(self) -> int:
        return sum(item.length for item in self.items)


@dataclass(slots=True)
class Formation(Generic[T]):
    batch: Batch[T] | None
    expired: list[QueuedItem[T]] = field(default_factory=list)


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int = 32
    max_batch_tokens: int = 8192  # padded tokens: n x max_len
    max_queue_items: int = 256
    max_queue_tokens: int = 65536  # real tokens waiting
    max_wait_s: float = 0.0  # hold a batch that is not yet full for at most this long


class BatchQueue(Generic[T]):
    def __init__(self, limits: BatchLimits, latency: LatencyModel) -> None:
        self.limits = limits
        self.latency = latency
        self._items: list[QueuedItem[T]] = []  # arrival order
        self._queued_tokens = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def put(self, item: QueuedItem[T]) -> None:
        if len(self._items) >= self.limits.max_queue_items:
            raise Overloaded("the request queue is full", retry_after_s=self.drain_estimate_s())
        if self._queued_tokens + item.length > self.limits.max_queue_tokens and self._items:
            raise Overloaded("too many tokens are queued", retry_after_s=self.drain_estimate_s())
        self._items.append(item)
        self._queued_tokens += item.length

    def discard(self, item: QueuedItem[T]) -> bool:
        """Remove an entry whose client went away; False if it already left the queue."""
        try:
            self._items.remove(item)
        except ValueError:
            return False
        self._queued_tokens -= item.length
        return True

    def drain_estimate_s(self, runtimes: int = 1) -> float:
        return self.latency.seconds_per_token() * self._queued_tokens / max(runtimes, 1)

    def oldest_wait_s(self, now: float) -> float:
        return now - self._items[0].enqueued_at if self._items else 0.0

    def next_batch(self, now: float) -> Formation[T]:
        """Form the next batch, or none yet if it could still grow within max_wait."""
        expired = self._remove_dead(now)
        if not self._items:
            return Formation(None, expired)
        batch = self._best_batch(now)
        waited = now - self._items[0].enqueued_at
        if waited < self.limits.max_wait_s and self._could_grow(batch):
            return Formation(None, expired)
        for item in batch.items:
            self._items.remove(item)
            self._queued_tokens -= item.length
        return Formation(batch, expired)

    def _could_grow(self, batch: Batch[T]) -> bool:
        return (
            batch.size < self.limits.max_batch_size
            and (batch.size + 1) * batch.max_len <= self.limits.max_batch_tokens
        )

    def _remove_dead(self, now: float) -> list[QueuedItem[T]]:
        expired = [item for item in self._items if item.deadline <= now and not item.cancelled]
        dead = [item for item in self._items if item.cancelled or item.deadline <= now]
        for item in dead:
            self._items.remove(item)
            self._queued_tokens -= item.length
        return expired

    def _best_batch(self, now: float) -> Batch[T]:
        anchor = self._items[0]
        others = sorted(self._items[1:], key=lambda item: item.length)
        lengths = [item.length for item in others]
        # Two cursors walk outwards from the anchor's length in sorted order; a side closes at
        # its first refusal (anything beyond is further in length and would cost more).
        right = bisect.bisect_left(lengths, anchor.length)
        left = right - 1
        chosen = [anchor]
        max_len = anchor.length
        predicted = self.latency.predict(1, max_len)
        limits = self.limits
        while len(chosen) < limits.max_batch_size and (left >= 0 or right < len(others)):
            take_left = right >= len(others) or (
                left >= 0 and anchor.length - lengths[left] <= lengths[right] - anchor.length
            )
            candidate = others[left] if take_left else others[right]
            new_max = max(max_len, candidate.length)
            size = len(chosen) + 1
            grown = self.latency.predict(size, new_max)
            # Join only if the batch grows by no more than the candidate would cost in a batch
            # of the same size made of inputs of its own length (what padding it adds must be
            # paid back by the per-call cost it shares).
            fits = size * new_max <= limits.max_batch_tokens
            pays = grown - predicted <= self.latency.predict(size, candidate.length) / size
            if take_left:
                left = left - 1 if fits and pays else -1
            else:
                right = right + 1 if fits and pays else len(others)
            if fits and pays:
                chosen.append(candidate)
                max_len = new_max
                predicted = grown
        return Batch(items=chosen, max_len=max_len, formed_at=now, predicted_s=predicted)
