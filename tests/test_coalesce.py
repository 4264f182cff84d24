"""Coalescing: one piece of work per key in flight, each waiter with its own future."""

from __future__ import annotations

import asyncio

import pytest

from engine.coalesce import InFlight


def test_waiters_share_one_work_and_each_gets_the_result() -> None:
    async def run() -> None:
        inflight: InFlight[int] = InFlight()
        work: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        first = inflight.start("k", work)
        others = [inflight.join("k", deadline=0.0) for _ in range(5)]
        assert all(o is not None for o in others)
        assert inflight.join("other", 0.0) is None
        work.set_result(42)
        assert await first == 42
        assert [await o for o in others if o is not None] == [42] * 5
        assert len(inflight) == 0 and inflight.join("k", 0.0) is None

    asyncio.run(run())


def test_one_waiter_leaving_does_not_cancel_the_others_work() -> None:
    async def run() -> None:
        inflight: InFlight[int] = InFlight()
        work: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        first = inflight.start("k", work)
        second = inflight.join("k", 0.0)
        assert second is not None
        first.cancel()
        await asyncio.sleep(0)
        assert not work.cancelled()
        work.set_result(7)
        assert await second == 7

    asyncio.run(run())


def test_the_work_is_cancelled_when_its_last_waiter_leaves() -> None:
    async def run() -> None:
        inflight: InFlight[int] = InFlight()
        work: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waiters = [inflight.start("k", work), inflight.join("k", 0.0)]
        for waiter in waiters:
            assert waiter is not None
            waiter.cancel()
        await asyncio.sleep(0)
        assert work.cancelled()
        assert inflight.join("k", 0.0) is None  # cancelled work is never joined
        await asyncio.sleep(0)
        assert len(inflight) == 0

    asyncio.run(run())


def test_errors_reach_every_waiter_and_joining_extends_the_deadline() -> None:
    async def run() -> None:
        inflight: InFlight[int] = InFlight()
        work: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        deadlines: list[float] = []
        first = inflight.start("k", work, deadlines.append)
        second = inflight.join("k", 12.5)
        assert deadlines == [12.5] and second is not None
        work.set_exception(RuntimeError("engine on fire"))
        for waiter in (first, second):
            with pytest.raises(RuntimeError, match="on fire"):
                await waiter

    asyncio.run(run())
