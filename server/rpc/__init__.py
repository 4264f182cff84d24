"""The gRPC transport (grpc.aio): the same tasks and error taxonomy as HTTP."""

from server.rpc import stubs

stubs.ensure()
