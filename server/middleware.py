"""Pure ASGI middleware: request-body size limit, cancellation on disconnect, request metrics.

Written as raw ASGI (not BaseHTTPMiddleware): the body limit refuses an oversized body before it
is read, and only the disconnect watcher costs a task, for requests still running once their
body is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from prometheus_client import Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.errors import ErrorKind
from server.errors import error_response


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0
        too_large = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            # Once the body overflowed, whatever the app answers (a framework turns the
            # exception into a 400) is replaced by the 413 below.
            if not too_large:
                await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, limited_receive, guarded_send)
        if too_large:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            ErrorKind.PAYLOAD_TOO_LARGE, f"the request body is larger than {self.max_bytes} bytes"
        )
        await response(scope, receive, send)


class CancelOnDisconnectMiddleware:
    """Cancel a request's handler when its client goes away, so its queued inputs leave the queue
    before compute (uvicorn reports the disconnect but lets the handler run on).

    The handler runs in the request's own task. Once it has read the body, a watcher task waits
    for the disconnect, started only if the handler is still running by the loop's next turn: a
    cache hit is answered before then and costs no task at all (two tasks a request before)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_task = asyncio.current_task()
        assert request_task is not None
        finished = client_gone = False
        watcher: asyncio.Task[None] | None = None

        async def watch() -> None:
            nonlocal client_gone
            # The handler no longer reads: the next message is ours.
            if (await receive())["type"] == "http.disconnect" and not finished:
                client_gone = True
                request_task.cancel()

        def start_watching() -> None:
            nonlocal watcher
            if not finished and watcher is None:
                watcher = asyncio.ensure_future(watch())

        async def tracking_receive() -> Message:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                asyncio.get_running_loop().call_soon(start_watching)
            return message

        try:
            await self.app(scope, tracking_receive, send)
        except asyncio.CancelledError:
            if not client_gone:
                raise
            request_task.uncancel()  # the cancellation was ours, and it is handled
        finally:
            finished = True
            if watcher is not None:
                watcher.cancel()


class RequestMetricsMiddleware:
    """Duration by route template, task and status; requests in flight."""

    def __init__(self, app: ASGIApp, duration: Histogram, in_flight: Gauge) -> None:
        self.app = app
        self.duration = duration
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 499  # stays so only if no response started: the client went away

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.in_flight.inc()
        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.in_flight.dec()
            state: dict[str, Any] = scope.get("state", {})
            self.duration.labels(_route(scope), state.get("task", ""), str(status)).observe(
                time.perf_counter() - started
            )


def _route(scope: Scope) -> str:
    """The matched route's template (the router records it in the scope): bounded cardinality."""
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched"))
