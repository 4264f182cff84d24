"""Coalescing: identical work in flight runs once, and every caller awaits its own future.

A caller that goes away (cancelled, timed out, disconnected) cancels only its own future; the
shared work is cancelled when its last caller has gone, so it leaves the queue before compute
without taking anyone else's result with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(eq=False)
class _Flight(Generic[T]):
    work: asyncio.Future[T]
    extend: Callable[[float], None] | None
    retain: bool = False
    waiters: set[asyncio.Future[T]] = field(default_factory=set)


class InFlight(Generic[T]):
    def __init__(self) -> None:
        self._flights: dict[str, _Flight[T]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def join(self, key: str, deadline: float) -> asyncio.Future[T] | None:
        """A new waiter on the work in flight under `key`, or None if there is none. The work's
        deadline is extended to the latest of its waiters' (each waiter keeps its own)."""
        flight = self._flights.get(key)
        if flight is None:
            return None
        if flight.work.done():
            # Retained after success until its result is stored (see `start`); otherwise its
            # callbacks are about to remove it.
            if not flight.retain or flight.work.cancelled() or flight.work.exception() is not None:
                return None
            finished: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            finished.set_result(flight.work.result())
            return finished
        if flight.extend is not None:
            flight.extend(deadline)
        return self._waiter(flight)

    def start(
        self,
        key: str,
        work: asyncio.Future[T],
        extend: Callable[[float], None] | None = None,
        retain: bool = False,
    ) -> asyncio.Future[T]:
        """Register `work` under `key` and return the first waiter on it. `extend(deadline)`
        pushes the work's own deadline back when a later waiter joins. `retain`: once it has
        succeeded, keep serving its result to new callers until `forget(key)` (the caller stores
        it in a cache meanwhile: without this, a caller arriving between the two would compute
        it again)."""
        flight = _Flight(work, extend, retain)
        self._flights[key] = flight
        work.add_done_callback(lambda _: self._finish(key, flight))
        return self._waiter(flight)

    def _waiter(self, flight: _Flight[T]) -> asyncio.Future[T]:
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        flight.waiters.add(waiter)
        waiter.add_done_callback(lambda _: self._leave(flight, waiter))
        return waiter

    def _leave(self, flight: _Flight[T], waiter: asyncio.Future[T]) -> None:
        flight.waiters.discard(waiter)
        if waiter.cancelled() and not flight.waiters and not flight.work.done():
            flight.work.cancel()

    def forget(self, key: str) -> None:
        """Stop serving the finished work under `key` (no-op for work still running)."""
        flight = self._flights.get(key)
        if flight is not None and flight.work.done():
            del self._flights[key]

    def _finish(self, key: str, flight: _Flight[T]) -> None:
        succeeded = not flight.work.cancelled() and flight.work.exception() is None
        if self._flights.get(key) is flight and not (flight.retain and succeeded):
            del self._flights[key]
        for waiter in list(flight.waiters):
            if waiter.done():
                continue
            if flight.work.cancelled():
                waiter.cancel()
            elif (error := flight.work.exception()) is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(flight.work.result())
