"""Pinning runtime threads to CPUs, and keeping numpy's BLAS off the runtimes' cores.

Measured here (2 CPUs, two single-thread sessions, the benchmark workload through the engine):
pinning each runtime thread to its own CPU gave ~6% more throughput than letting the scheduler
move them, which it does whenever the event loop wakes up. It is only safe when the process
owns exactly the CPUs it pins to (a dedicated machine or a cpuset container): on a shared
node whose affinity mask lists every CPU, pinning would pile every replica onto the same ones.
"""

from __future__ import annotations

import os
import threading
from typing import Literal

PinMode = Literal["auto", "on", "off"]


def single_threaded_blas() -> None:
    """numpy's BLAS on one thread in this process. The server's numpy matmuls are tiny (heads on
    pooled states, per batch on the runtime threads), and a multithreaded OpenBLAS wakes its own
    pool for each, whose threads spin on the cores ONNX Runtime computes on. Measured here at
    concurrency 32 on the benchmark workload: 168 req/s with OpenBLAS's default threads, 259-273
    with one (the runtime threads got 0.5 core each instead of 0.75-0.85); nothing changed at 8."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def runtime_cpus(mode: PinMode, runtimes: int, threads_per_runtime: int) -> list[int] | None:
    """The CPU for each runtime thread, or None to leave placement to the scheduler."""
    if mode == "off" or threads_per_runtime != 1 or not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if mode == "auto" and len(allowed) > runtimes:
        return None
    return [allowed[i % len(allowed)] for i in range(runtimes)]


def pin_current_thread(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def lower_thread_priority(niceness: int) -> None:
    """Raise the calling thread's nice value by `niceness` (Linux: nice is per thread). Lowering
    one's own priority needs no privilege; where it is not supported, nothing happens."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + niceness, 19))
    except (AttributeError, OSError):
        pass
