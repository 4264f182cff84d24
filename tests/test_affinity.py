"""When runtime threads are pinned to CPUs, and when they are left alone."""

from __future__ import annotations

import pytest

from engine.runtime import affinity


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
