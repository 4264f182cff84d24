"""When runtime threads are pinned to CPUs, and when they are left alone; numpy's BLAS threads."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from engine.runtime import affinity
from server.app import create_app
from server.settings import Settings


@pytest.fixture
def cpus(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    allowed = [4, 5]
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(allowed))
    return allowed


def test_auto_pins_when_the_process_owns_no_more_cpus_than_runtimes(cpus: list[int]) -> None:
    assert affinity.runtime_cpus("auto", runtimes=2, threads_per_runtime=1) == [4, 5]


def test_auto_leaves_a_shared_machine_alone(cpus: list[int]) -> None:
    assert affinity.runtime_cpus("auto", runtimes=1, threads_per_runtime=1) is None


def test_multi_threaded_runtimes_are_never_pinned(cpus: list[int]) -> None:
    assert affinity.runtime_cpus("on", runtimes=2, threads_per_runtime=2) is None


def test_on_and_off_force_the_choice(cpus: list[int]) -> None:
    assert affinity.runtime_cpus("on", runtimes=3, threads_per_runtime=1) == [4, 5, 4]
    assert affinity.runtime_cpus("off", runtimes=2, threads_per_runtime=1) is None


def test_the_server_keeps_numpys_blas_on_one_thread(bundle_dir: Path) -> None:
    """A multithreaded OpenBLAS spins on the cores ONNX Runtime computes on (measured: -37% at
    concurrency 32); the server limits it when it builds its service."""
    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    with TestClient(create_app(Settings(bundle=bundle_dir, cache=False, grpc=False))):
        # Every BLAS in the process: numpy's, and scipy's where a test imported the build's
        # evaluation (seqeval -> scikit-learn). A fresh process has one thread per core in each.
        threads = blas_threads()
        assert threads and all(count == 1 for count in threads), threads
