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


def test_retained_work_answers_late_callers_until_forgotten_and_failures_are_never_retained() -> None:
    """Between the work finishing and its result reaching the cache, a late caller joins the
    finished work instead of computing it again."""

    async def run() -> None:
        inflight: InFlight[int] = InFlight()
        loop = asyncio.get_running_loop()
        work: asyncio.Future[int] = loop.create_future()
        first = inflight.start("k", work, retain=True)
        work.set_result(7)
        assert await first == 7
        late = inflight.join("k", 0.0)
        assert late is not None and await late == 7
        inflight.forget("k")
        assert inflight.join("k", 0.0) is None and len(inflight) == 0
        failing: asyncio.Future[int] = loop.create_future()
        waiter = inflight.start("f", failing, retain=True)
        failing.set_exception(RuntimeError("runtime on fire"))
        with pytest.raises(RuntimeError):
            await waiter
        assert inflight.join("f", 0.0) is None and len(inflight) == 0

    asyncio.run(run())
