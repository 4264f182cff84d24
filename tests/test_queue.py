"""Batch formation as plain state: no model, no threads, no event loop."""

from __future__ import annotations

import random

import numpy as np
import pytest

from engine.cost_model import LatencyModel
from engine.errors import Overloaded
from engine.queue import BatchLimits, BatchQueue, QueuedItem


def padded_cost_model(per_call_s: float = 1e-3, per_token_s: float = 1e-5) -> LatencyModel:
    model = LatencyModel()
    for size, length in [(1, 8), (1, 64), (4, 32), (8, 128), (16, 16), (2, 256)]:
        model.observe(size, length, per_call_s + per_token_s * size * length)
    model.refit()
    return model


def item(length: int, at: float = 0.0, deadline: float = 1e9, name: str = "") -> QueuedItem[str]:
    return QueuedItem(length=length, enqueued_at=at, deadline=deadline, payload=name or str(length))


def make_queue(**limits: float) -> BatchQueue[str]:
    return BatchQueue(BatchLimits(**limits), padded_cost_model())  # type: ignore[arg-type]


def test_latency_model_learns_a_linear_cost() -> None:
    model = padded_cost_model(per_call_s=2e-3, per_token_s=3e-5)
    assert model.predict(4, 100) == pytest.approx(2e-3 + 3e-5 * 400, rel=0.05)
    assert model.predict(16, 100) > model.predict(4, 100)


def test_batch_groups_similar_lengths_around_the_oldest() -> None:
    queue = make_queue()
    for length, at in [(20, 0.0), (200, 0.1), (22, 0.2), (210, 0.3), (18, 0.4)]:
        queue.put(item(length, at))
    batch = queue.next_batch(now=1.0).batch
    assert batch is not None
    assert sorted(i.length for i in batch.items) == [18, 20, 22]
    assert batch.max_len == 22
    rest = queue.next_batch(now=1.0).batch
    assert rest is not None and sorted(i.length for i in rest.items) == [200, 210]


def test_oldest_input_always_rides_the_next_batch() -> None:
    """A long input does not starve behind a stream of short ones."""
    queue = make_queue(max_batch_tokens=1024)
    queue.put(item(500, at=0.0, name="long"))
    for i in range(50):
        queue.put(item(10, at=0.1 + i * 0.01))
    batch = queue.next_batch(now=1.0).batch
    assert batch is not None and batch.items[0].payload == "long"


def test_no_batch_crosses_a_length_boundary() -> None:
    """Inputs of 380 and 390 tokens would share a batch, but 384 is where the encoder's
    computation changes (its dense branch ends): each side is batched alone."""
    queue: BatchQueue[str] = BatchQueue(BatchLimits(length_boundaries=(384,)), padded_cost_model())
    for length, at in [(380, 0.0), (390, 0.1), (384, 0.2)]:
        queue.put(item(length, at))
    first = queue.next_batch(now=1.0).batch
    second = queue.next_batch(now=1.0).batch
    assert first is not None and second is not None
    assert sorted(i.length for i in first.items) == [380, 384]
    assert [i.length for i in second.items] == [390]
    unbounded = make_queue()
    for length, at in [(380, 0.0), (390, 0.1), (384, 0.2)]:
        unbounded.put(item(length, at))
    together = unbounded.next_batch(now=1.0).batch
    assert together is not None and together.size == 3  # the boundary, not the cost, split them


def test_long_inputs_are_not_paired_while_another_runtime_could_read_one() -> None:
    """Batched, two 350-token inputs save one per-call cost and double the first one's latency:
    with two runtimes and little else waiting, each is read alone; one runtime, or a queue deep
    enough to keep both runtimes busy for longer than the pair takes, batches them."""

    def first_batch(runtimes: int, shorts: int) -> list[int]:
        queue = make_queue()
        queue.put(item(350, at=0.0))
        queue.put(item(352, at=0.1))
        for i in range(shorts):
            queue.put(item(20 + i % 3, at=0.2 + i * 0.01))
        batch = queue.next_batch(now=1.0, runtimes=runtimes).batch
        assert batch is not None
        return sorted(i.length for i in batch.items)

    assert first_batch(runtimes=2, shorts=2) == [350]
    assert first_batch(runtimes=1, shorts=2) == [350, 352]
    assert first_batch(runtimes=2, shorts=40) == [350, 352]


def test_token_budget_and_size_cap_bound_a_batch() -> None:
    queue = make_queue(max_batch_tokens=256, max_batch_size=4)
    for i in range(10):
        queue.put(item(60 + i, at=i * 0.01))
    batch = queue.next_batch(now=1.0).batch
    assert batch is not None
    assert batch.size <= 4
    assert batch.padded_tokens <= 256


def test_expired_and_cancelled_inputs_are_never_batched() -> None:
    queue = make_queue()
    late = item(10, at=0.0, deadline=0.5, name="late")
    gone = item(10, at=0.0, name="gone")
    gone.cancelled = True
    queue.put(late)
    queue.put(gone)
    queue.put(item(10, at=0.1, name="ok"))
    formation = queue.next_batch(now=1.0)
    assert [i.payload for i in formation.expired] == ["late"]
    assert formation.batch is not None and [i.payload for i in formation.batch.items] == ["ok"]
    assert len(queue) == 0 and queue.queued_tokens == 0


def test_full_queue_refuses_with_a_retry_hint() -> None:
    queue = make_queue(max_queue_items=2)
    queue.put(item(10))
    queue.put(item(10))
    with pytest.raises(Overloaded) as raised:
        queue.put(item(10))
    assert raised.value.retry_after_s is not None


def test_token_cap_refuses_but_never_an_empty_queue() -> None:
    queue = make_queue(max_queue_tokens=600)
    queue.put(item(500))
    with pytest.raises(Overloaded):
        queue.put(item(200))
    queue.discard(queue.next_batch(now=1.0).batch.items[0])  # type: ignore[union-attr]
    queue.put(item(700))  # alone it is admitted: the cap must not block an input forever


def test_max_wait_holds_a_batch_that_could_still_grow() -> None:
    queue = make_queue(max_wait_s=0.01)
    queue.put(item(10, at=0.0))
    assert queue.next_batch(now=0.005).batch is None
    batch = queue.next_batch(now=0.011).batch
    assert batch is not None and batch.size == 1


def test_discard_removes_a_waiting_input_once() -> None:
    queue = make_queue()
    waiting = item(10)
    queue.put(waiting)
    assert queue.discard(waiting)
    assert not queue.discard(waiting)
    assert queue.queued_tokens == 0


def test_low_priority_waits_behind_fresher_normal_inputs_but_is_never_starved() -> None:
    queue = make_queue(max_batch_size=1)
    old_low = QueuedItem(length=300, enqueued_at=0.0, deadline=1e9, payload="low", priority="low")
    queue.put(old_low)
    queue.put(item(20, at=0.2, name="normal"))
    first = queue.next_batch(now=0.3).batch
    assert first is not None and first.items[0].payload == "normal"  # 0.3 s older is not enough
    queue.put(item(20, at=0.8, name="later normal"))
    second = queue.next_batch(now=0.9).batch
    assert second is not None and second.items[0].payload == "low"  # aged past the head start


def test_high_priority_goes_first_and_finds_room_in_a_queue_full_for_others() -> None:
    queue = make_queue(max_batch_size=1, max_queue_items=10)
    for i in range(6):
        queue.put(item(20, at=float(i), name=f"n{i}"))
    assert not queue.has_room(1, 20, "low")  # low may fill 60% of the queue
    assert queue.has_room(1, 20, "normal")
    for i in range(4):
        queue.put(item(20, at=6.0 + i))
    assert not queue.has_room(1, 20, "normal") and queue.has_room(1, 20, "high")  # high: 110%
    queue.put(QueuedItem(length=20, enqueued_at=6.1, deadline=1e9, payload="urgent", priority="high"))
    with pytest.raises(Overloaded):
        queue.put(item(20, at=7.0))
    batch = queue.next_batch(now=6.2).batch
    assert batch is not None and batch.items[0].payload == "n0"  # 6.2 s old beats a 0.25 s head start
    batch = queue.next_batch(now=6.2).batch
    assert batch is not None and batch.items[0].payload == "n1"
    queue2 = make_queue(max_batch_size=1)
    queue2.put(item(20, at=1.0, name="normal"))
    queue2.put(QueuedItem(length=20, enqueued_at=1.1, deadline=1e9, payload="urgent", priority="high"))
    batch = queue2.next_batch(now=1.2).batch
    assert batch is not None and batch.items[0].payload == "urgent"


def test_costs_are_the_predictions_of_each_size() -> None:
    model = padded_cost_model()
    model._set(np.array([1e-3, 2e-5, 3e-6, 4e-7]))  # every term of the curve in play
    for length in (1, 17, 384):
        assert model.costs(length, 40) == pytest.approx([model.predict(n, length) for n in range(1, 41)])


def _reference_groups(lengths: list[int], limits: BatchLimits, model: LatencyModel) -> list[list[int]]:
    """The partition, written as the docstring states it: every contiguous group that fits."""
    lengths = sorted(lengths)
    best, cut = [0.0] + [float("inf")] * len(lengths), [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        for size in range(1, min(limits.max_batch_size, end) + 1):
            shortest, longest = lengths[end - size], lengths[end - 1]
            if size > 1 and size * longest > limits.max_batch_tokens:
                break
            if any(shortest <= b < longest for b in limits.length_boundaries):
                break
            if best[end - size] + model.predict(size, longest) < best[end]:
                best[end], cut[end] = best[end - size] + model.predict(size, longest), end - size
    groups, end = [], len(lengths)
    while end:
        groups.append(lengths[cut[end] : end])
        end = cut[end]
    return sorted(groups)


def test_batch_formation_takes_the_best_partition() -> None:
    rng = random.Random(3)
    model = padded_cost_model(per_call_s=2e-3, per_token_s=2e-5)
    model._set(np.array([2e-3, 2e-5, 1e-6, 1e-6]))
    for _ in range(60):
        limits = BatchLimits(
            max_batch_size=rng.choice([1, 4, 32]),
            max_batch_tokens=rng.choice([256, 2048, 8192]),
            length_boundaries=tuple(rng.sample([64, 128, 256], rng.randint(0, 2))),
        )
        lengths = [rng.randint(2, 512) for _ in range(rng.randint(1, 60))]
        queue: BatchQueue[str] = BatchQueue(limits, model)
        for i, length in enumerate(lengths):
            queue.put(item(length, at=i * 1e-3), admitted=True)
        formed = []
        while len(queue):
            batch = queue.next_batch(now=1.0).batch
            assert batch is not None
            formed.append(sorted(i.length for i in batch.items))
        # Each batch is the oldest input's group of the best partition of what is left, so the
        # first one is a group of the partition of everything.
        assert formed[0] in _reference_groups(lengths, limits, model)


@pytest.mark.parametrize(
    ("long_arrives_s", "credit", "first"),
    [(0.002, 1.0, "long"), (0.010, 1.0, "short"), (0.002, 0.0, "short")],
)
def test_a_long_input_is_credited_its_own_compute_time_and_no_more(
    long_arrives_s: float, credit: float, first: str
) -> None:
    """Ranked by arrival less its own predicted compute time: a 400-token input (~5 ms here)
    goes before a short one that came 2 ms earlier, not before one that came 10 ms earlier;
    without the credit (compute_credit=0) by arrival alone."""
    queue = make_queue(max_batch_tokens=512, compute_credit=credit)
    queue.put(item(10, at=0.000, name="short"))
    queue.put(item(400, at=long_arrives_s, name="long"))
    batch = queue.next_batch(now=1.0).batch
    assert batch is not None and [i.payload for i in batch.items] == [first]


def test_a_shallow_queue_caps_the_batch_and_a_deep_one_lifts_the_cap() -> None:
    """Same-length inputs batch together freely (no padding), so only the cap holds them apart."""
    shallow = make_queue(shallow_max_batch_size=2, deep_queue_inputs=12)
    for i in range(11):
        shallow.put(item(30, at=i * 0.001))
    batch = shallow.next_batch(now=1.0).batch
    assert batch is not None and batch.size == 2
    assert [i.enqueued_at for i in batch.items] == [0.0, 0.001]  # the oldest leave first
    deep = make_queue(shallow_max_batch_size=2, deep_queue_inputs=12)
    for i in range(12):
        deep.put(item(30, at=i * 0.001))
    batch = deep.next_batch(now=1.0).batch
    assert batch is not None and batch.size > 2


def test_the_shallow_cap_never_holds_a_batch_for_growth_it_forbids() -> None:
    queue = make_queue(max_wait_s=0.01, shallow_max_batch_size=2)
    queue.put(item(10, at=0.0))
    queue.put(item(10, at=0.0))
    batch = queue.next_batch(now=0.001).batch
    assert batch is not None and batch.size == 2
