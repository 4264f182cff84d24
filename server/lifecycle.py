"""The process's life: uvicorn with readiness that turns false the moment SIGTERM arrives, and
an exit status that tells an orchestrator when the encoder runtimes died.

SIGTERM / SIGINT: readiness answers 503 at once; uvicorn stops accepting connections, lets every
request it accepted finish (their inputs are queued or computing: the batcher keeps running
until the lifespan ends), up to `--shutdown-grace-s`, then the process exits 0.
A dead or hung runtime (engine/batcher.py): what waits fails with 503 at once, and the process
exits with EXIT_RUNTIME_FAILED so that it is restarted rather than left answering 503.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from engine.bundle import Bundle
from server.app import create_app
from server.settings import Settings

log = logging.getLogger("sparsebert")
EXIT_RUNTIME_FAILED = 3
# Between closing the listeners and asking each connection to finish: long enough for the loop
# to read requests already sent on connections it accepted (loopback delivers them at once; a
# loaded loop turns in a few ms), so that they are served rather than closed unread.
READ_SENT_REQUESTS_S = 0.1


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Unready at once, then uvicorn's graceful shutdown. Unlike uvicorn's own handler this
        does not re-raise the signal once drained: a completed drain is a clean exit (status 0),
        not a death by SIGTERM. A second SIGINT still forces the exit."""
        if not self.app.state.draining:
            log.info("signal %d: unready now; finishing accepted requests, then exiting", sig)
        self.app.state.draining = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's graceful shutdown closes at once every connection with no request in
        progress, including one whose request has arrived but is not read yet: its client sees
        the connection close with no answer (the SIGTERM test under load saw two). So
        the listeners close first, and the connections are asked to finish only once what was
        sent on them has been read."""
        for server in self.servers:
            server.close()
        await asyncio.sleep(READ_SENT_REQUESTS_S)
        await super().shutdown(sockets)


def run(settings: Settings, bundle: Bundle) -> int:
    """Serve until a signal (0) or a runtime failure (EXIT_RUNTIME_FAILED)."""
    failures: list[str] = []
    server: DrainingServer | None = None

    def on_fatal(reason: str) -> None:
        failures.append(reason)
        if server is not None:
            server.app.state.draining = True
            server.should_exit = True

    app = create_app(settings, bundle, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        server_header=False,  # no "server: uvicorn" on every response: it names the stack to scanners
    )
    server = DrainingServer(config, app)
    server.run()
    if failures:
        log.error("exiting with status %d: %s", EXIT_RUNTIME_FAILED, failures[0])
        return EXIT_RUNTIME_FAILED
    return 0
