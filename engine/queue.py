"""The request queue and batch formation: plain state, no threads, no event loop, no model.

Batch formation, each time a runtime is free:
1. drop entries that were cancelled or whose deadline has passed (they are never computed);
2. anchor the batch on the oldest entry, so no input waits behind an endless stream of others
   (a long input cannot starve); "oldest" is by age plus two head starts: the priority's (high:
   0.25 s, low: -0.5 s), and the entry's own predicted compute time alone, so that a long input,
   whose compute already makes it the latency tail, does not also wait longest in the queue
   (both bounded: nothing is delayed by more than them, nothing starves);
3. choose its companions by the latency model: of all ways to cut the waiting inputs, sorted by
   length, into batches (a padded batch costs n x max_len, within the token budget and the size
   cap, which is smaller while the queue is shallow), take the one predicted to serve them all
   soonest, with no batch longer than the waiting work's share per runtime; the next batch is
   the anchor's group.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from engine.cost_model import LatencyModel
from engine.errors import Overloaded

T = TypeVar("T")
# Batch formation looks at most this many waiting inputs (those nearest the oldest in length).
LOOKAHEAD = 128

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")
# Seconds of age an entry is credited with (aging: a low entry overtakes fresh normal ones once
# it has waited 0.5 s longer), and the share of the queue bounds each priority may fill: normal
# traffic gets the bounds as configured, low priority is refused once the queue is 60% full,
# and high priority may go 10% past the bounds, so it finds room when normal traffic cannot.
PRIORITY_HEAD_START_S: dict[Priority, float] = {"high": 0.25, "normal": 0.0, "low": -0.5}
PRIORITY_QUEUE_SHARE: dict[Priority, float] = {"high": 1.1, "normal": 1.0, "low": 0.6}


def demoted(priority: Priority) -> Priority:
    """One level down (low stays low): the priority of a document's windows. Documents are
    read in windows of hundreds of tokens under a looser latency objective than short
    interactive inputs, which would otherwise wait behind them."""
    return PRIORITIES[min(PRIORITIES.index(priority) + 1, len(PRIORITIES) - 1)]


@dataclass(eq=False, slots=True)
class QueuedItem(Generic[T]):
    length: int
    enqueued_at: float
    deadline: float
    payload: T
    cancelled: bool = False
    priority: Priority = "normal"
    predicted_wait_s: float = 0.0  # the uncorrected drain estimate when it was queued
    compute_s: float = 0.0  # its predicted compute time alone, set when queued
    credit_s: float = 0.0  # the head start its compute earns it (BatchLimits.compute_credit)

    @property
    def rank(self) -> float:
        """Smaller is served first: the arrival time less the priority's head start and less the
        head start of the entry's own compute time."""
        return self.enqueued_at - PRIORITY_HEAD_START_S[self.priority] - self.credit_s


@dataclass(slots=True)
class Batch(Generic[T]):
    items: list[QueuedItem[T]]
    max_len: int
    formed_at: float
    predicted_s: float
    verify: bool = False  # also measure what the sparse attention pattern keeps (sampled)

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
    # No batch holds inputs on both sides of a boundary: lengths where the encoder's computation
    # changes with the batch's length (sparse attention takes its dense branch up to a length),
    # so an input's result never depends on the batch it lands in.
    length_boundaries: tuple[int, ...] = ()
    # The share of an entry's predicted compute time credited to its age when choosing the oldest
    # (0: by arrival). A long input's compute already makes it the latency tail; the credit lets it
    # start that much earlier. Measured through the server at concurrency 8 on the benchmark
    # workload (three runs each): no credit p99/p50 2.86-2.99, full credit 2.51-2.59; half and
    # double credit were no better, nor any other share in the calibrated simulation
    # (loadtest/queue_sim.py).
    compute_credit: float = 1.0
    # While fewer than `deep_queue_inputs` wait, a batch holds at most `shallow_max_batch_size`
    # inputs (None: no such cap). On a CPU a batch saves little more than the per-call overhead,
    # and a big one makes its first inputs wait for its last: the oldest inputs leave sooner in
    # pairs. Once the queue is deep, batches may fill up again, since capacity is what counts
    # then. Measured through the server, interleaved in 2 s slices for 60 s each way at
    # concurrency 8: p99/p50 2.49-2.51 -> 2.36-2.38, p99 88.7-88.8 -> 85.2-87.0 ms, throughput
    # within 2%; at 32 no change (1.98 both, throughput within 0.5%).
    shallow_max_batch_size: int | None = None
    deep_queue_inputs: int = 12


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

    def has_room(self, items: int, tokens: int, priority: Priority = "normal") -> bool:
        """Whether `items` inputs of `tokens` tokens in all fit, within the share of the bounds
        that `priority` may fill. The token cap never refuses inputs into an empty queue, or a
        long one could never run."""
        share = PRIORITY_QUEUE_SHARE[priority]
        if len(self._items) + items > max(int(self.limits.max_queue_items * share), 1):
            return False
        return not (self._items and self._queued_tokens + tokens > self.limits.max_queue_tokens * share)

    def put(self, item: QueuedItem[T], admitted: bool = False) -> None:
        """`admitted`: the caller already checked room for a larger whole this item belongs to
        (a long document's windows are queued a few at a time, after one admission)."""
        if not admitted and not self.has_room(1, item.length, item.priority):
            raise Overloaded("the request queue is full", retry_after_s=self.drain_estimate_s())
        item.compute_s = self.latency.predict(1, item.length)
        item.credit_s = self.limits.compute_credit * item.compute_s
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

    def drain(self) -> list[QueuedItem[T]]:
        """Remove and return every waiting entry (the runtimes failed: they are failed at once)."""
        items, self._items = self._items, []
        self._queued_tokens = 0
        return items

    def drain_estimate_s(self, runtimes: int = 1) -> float:
        return self.latency.seconds_per_token() * self._queued_tokens / max(runtimes, 1)

    def oldest_wait_s(self, now: float) -> float:
        return now - self._items[0].enqueued_at if self._items else 0.0

    def next_batch(self, now: float, runtimes: int = 1) -> Formation[T]:
        """Form the next batch, or none yet if it could still grow within max_wait. `runtimes`:
        how many runtimes share the waiting work (see _best_batch)."""
        expired = self._remove_dead(now)
        if not self._items:
            return Formation(None, expired)
        anchor = min(self._items, key=lambda item: item.rank)
        batch = self._best_batch(now, anchor, runtimes)
        waited = now - self._items[0].enqueued_at
        if waited < self.limits.max_wait_s and self._could_grow(batch):
            return Formation(None, expired)
        for item in batch.items:
            self._items.remove(item)
            self._queued_tokens -= item.length
        return Formation(batch, expired)

    def _size_cap(self) -> int:
        limits = self.limits
        if limits.shallow_max_batch_size is not None and len(self._items) < limits.deep_queue_inputs:
            return min(limits.shallow_max_batch_size, limits.max_batch_size)
        return limits.max_batch_size

    def _could_grow(self, batch: Batch[T]) -> bool:
        return (
            batch.size < self._size_cap() and (batch.size + 1) * batch.max_len <= self.limits.max_batch_tokens
        )

    def _remove_dead(self, now: float) -> list[QueuedItem[T]]:
        expired = [item for item in self._items if item.deadline <= now and not item.cancelled]
        dead = [item for item in self._items if item.cancelled or item.deadline <= now]
        for item in dead:
            self._items.remove(item)
            self._queued_tokens -= item.length
        return expired

    def _best_batch(self, now: float, anchor: QueuedItem[T], runtimes: int = 1) -> Batch[T]:
        """The group holding the anchor (the oldest input, by rank), in the partition of the
        waiting inputs into contiguous length groups that the latency model says serves them all
        soonest.

        Sorted by length, the best partition is a short dynamic programme: best[j] is the least
        predicted time to serve the j shortest inputs, the last group being inputs j-k..j-1
        padded to the length of input j-1. It sees all that waits, so an input joins a padded
        batch when the alternative is a batch too small to pay for its own per-call cost.

        That sum of batch times is what one runtime would take. With several, no batch of more
        than one input may be predicted to take longer than the waiting work's share per runtime
        (each waiting input's own compute time, summed, over `runtimes`): two long inputs batched
        together save a few percent of compute and double the first one's latency, while the
        other runtime could have read one of them meanwhile. A deep queue leaves that cap far
        above any batch. Measured at concurrency 8 on the benchmark workload (a diagnostic,
        three runs each, interleaved): p99/p50 2.43-2.54 -> 2.28-2.39; at 32 throughput within
        noise (336-374 req/s with the cap, 335-358 without)."""
        ordered = sorted(self._items, key=lambda item: item.length)
        if len(ordered) > LOOKAHEAD:
            position = ordered.index(anchor)
            start = min(max(position - LOOKAHEAD // 2, 0), len(ordered) - LOOKAHEAD)
            ordered = ordered[start : start + LOOKAHEAD]
        lengths = [item.length for item in ordered]
        limits = self.limits
        # A group may reach back only to the first input on its side of every length boundary.
        boundaries = sorted(limits.length_boundaries)
        ranges = [bisect_left(boundaries, length) for length in lengths]
        range_start = [0] * len(ordered)
        for i in range(1, len(ordered)):
            range_start[i] = range_start[i - 1] if ranges[i] == ranges[i - 1] else i
        # Plain loops over precomputed costs: this runs each time a runtime frees up, on the
        # event loop, for up to LOOKAHEAD x max_batch_size candidate groups.
        longest_batch_s = sum(item.compute_s for item in self._items) / max(runtimes, 1)
        size_cap = self._size_cap()
        best = [0.0] + [float("inf")] * len(ordered)
        cut = [0] * (len(ordered) + 1)
        for end in range(1, len(ordered) + 1):
            longest = lengths[end - 1]
            by_tokens = max(limits.max_batch_tokens // longest, 1)
            sizes = min(size_cap, by_tokens, end - range_start[end - 1])
            costs = self.latency.costs(longest, sizes)
            least, least_cut = best[end], cut[end]
            for size in range(1, sizes + 1):
                if size > 1 and costs[size - 1] > longest_batch_s:
                    break  # costs grow with size
                total = best[end - size] + costs[size - 1]
                if total < least:
                    least, least_cut = total, end - size
            best[end], cut[end] = least, least_cut
        end = len(ordered)
        while True:
            group = ordered[cut[end] : end]
            if any(item is anchor for item in group):
                break
            end = cut[end]
        # Oldest first inside the batch, so its results are the first to be handed back.
        group.sort(key=lambda item: item.enqueued_at)
        max_len = max(item.length for item in group)
        predicted_s = self.latency.predict(len(group), max_len)
        return Batch(items=group, max_len=max_len, formed_at=now, predicted_s=predicted_s)
