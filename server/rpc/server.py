"""The grpc.aio server beside the HTTP one, on the same event loop and engine: the Inference
service, the standard health service (SERVING once warmed up) and server reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from engine.service import Service
from server.access import KeyRing
from server.rpc import sparsebert_pb2 as pb
from server.rpc import sparsebert_pb2_grpc as pb_grpc
from server.rpc.servicer import InferenceServicer

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
READINESS_POLL_S = 0.25


class GrpcServer:
    def __init__(
        self,
        service: Callable[[], Service | None],
        serving: Callable[[], bool],
        keys: KeyRing | None,
        address: str,
        max_message_bytes: int,
    ) -> None:
        """`serving()`: whether this replica takes new work (warmed up, not draining)."""
        self._serving = serving
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),  # a port taken by another process is an error, not shared
            ]
        )
        pb_grpc.add_InferenceServicer_to_server(  # type: ignore[no-untyped-call]
            InferenceServicer(service, keys), self._server
        )
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, self._server)
        self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen for gRPC on {address}")
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        self._watcher = asyncio.create_task(self._track_readiness())
        log.info("gRPC listening on port %d", self.port)

    async def _track_readiness(self) -> None:
        """Health follows readiness: SERVING once warmed up, NOT_SERVING when draining or when
        the encoder runtime fails."""
        current = None
        while True:
            serving = self._serving()
            if serving != current:
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if serving
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                for name in ("", SERVICE_NAME):
                    await self.health.set(name, status)
                current = serving
            await asyncio.sleep(READINESS_POLL_S)

    async def drain(self) -> None:
        """Health NOT_SERVING at once (SIGTERM): load balancers stop sending new calls."""
        if self._watcher is not None:
            self._watcher.cancel()
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace_s: float) -> None:
        await self.drain()
        if self._watcher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._server.stop(grace_s)
