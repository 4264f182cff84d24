"""Shared fixtures: the real bundle, and real servers on free loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = Path(os.environ.get("SPARSEBERT_TEST_BUNDLE", ROOT / "bundles" / "minilm-multitask"))


@pytest.fixture(scope="session")
def bundle_dir() -> Path:
    if not (BUNDLE / "manifest.json").is_file():
        pytest.fail(f"no bundle at {BUNDLE}: run `make bundle` (the test command does) first")
    return BUNDLE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunningServer:
    def __init__(self, bundle: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port),
             "--bundle", str(bundle), "--log-level", "warning", *flags],
            cwd=ROOT,
        )  # fmt: skip

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_server(bundle: Path, *flags: str) -> Generator[httpx.Client, None, None]:
    server = RunningServer(bundle, *flags)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            yield client
    finally:
        server.stop()


@pytest.fixture(scope="session")
def client(bundle_dir: Path) -> Iterator[httpx.Client]:
    """The server as `sparsebert serve` runs it, on the real bundle, over real HTTP."""
    yield from start_server(bundle_dir)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the test session; tests use their own namespaces in it."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
