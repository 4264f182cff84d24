"""Start `sparsebert serve` in a child process on a free loopback port (benchmarks and tests)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    bundle: Path, port: int, flags: tuple[str, ...], timeout_s: float = 180
) -> subprocess.Popen[bytes]:
    """The server, once /health/ready answers 200. Its gRPC API gets a free port too, unless
    `flags` name one (or turn it off): several servers run side by side in the tests."""
    if not {"--grpc-port", "--no-grpc"} & set(flags):
        flags = (*flags, "--grpc-port", str(free_port()))
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--bundle", str(bundle), "--port", str(port),
         "--log-level", "warning", *flags],
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise TimeoutError("server did not become ready")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
