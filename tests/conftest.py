"""Shared fixtures: the real bundle, and real servers on free loopback ports."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import httpx
import pytest

from loadtest import server_process
from loadtest.redis_server import RedisServer
from loadtest.server_process import free_port

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = Path(os.environ.get("SPARSEBERT_TEST_BUNDLE", ROOT / "bundles" / "minilm-multitask"))


@pytest.fixture(scope="session")
def bundle_dir() -> Path:
    if not (BUNDLE / "manifest.json").is_file():
        pytest.fail(f"no bundle at {BUNDLE}: run `make bundle` (the test command does) first")
    return BUNDLE


def start_server(bundle: Path, *flags: str) -> Generator[httpx.Client, None, None]:
    port = free_port()
    process = server_process.start_server(bundle, port, flags, timeout_s=120)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as client:
            yield client
    finally:
        server_process.stop_server(process)


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
