"""GPU memory metrics, exported only while a CUDA device is in use (absent, not zero, on CPU).

From torch's caching allocator (`torch.cuda.memory_stats`, for runtimes that allocate through
torch): reserved and allocated bytes and the fragmentation ratio, inactive_split_bytes /
reserved_bytes, the share of reserved memory held in split blocks that no live tensor uses,
which a long mixed-length load grows; allocation retries (the allocator freed its cache to
satisfy a request: a sign of pressure) and out-of-memory errors. From NVML: utilization, and
for runtimes whose memory torch does not see (ONNX Runtime's CUDA arena, TensorRT) used bytes
as reserved; no fragmentation there (NVML cannot see inside an allocator).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.metrics import PREFIX

# device index -> torch.cuda.memory_stats(device) (the keys used below), or NVML's numbers
# under the same keys, plus UTILIZATION (NVML, percent).
DeviceStats = Mapping[int, Mapping[str, int]]
UTILIZATION = "nvml.utilization.gpu"


def fragmentation_ratio(stats: Mapping[str, int]) -> float | None:
    reserved = stats.get("reserved_bytes.all.current", 0)
    inactive_split = stats.get("inactive_split_bytes.all.current")
    if inactive_split is None or reserved <= 0:
        return None
    return inactive_split / reserved


ValueOf = Callable[[Mapping[str, int]], float | None]
# (name, counter?, help, the value from one device's stats: None leaves the device out)
FAMILIES: tuple[tuple[str, bool, str, ValueOf], ...] = (
    ("gpu_memory_reserved_bytes", False, "Memory the GPU allocator holds.",
     lambda stats: stats.get("reserved_bytes.all.current", 0)),
    ("gpu_memory_allocated_bytes", False, "Memory in live tensors.",
     lambda stats: stats.get("allocated_bytes.all.current")),
    ("gpu_memory_fragmentation_ratio", False, "inactive_split_bytes / reserved_bytes (caching allocator).",
     fragmentation_ratio),
    ("gpu_memory_alloc_retries", True, "Allocations that succeeded only after the allocator freed its cache.",
     lambda stats: stats.get("num_alloc_retries")),
    ("gpu_memory_ooms", True, "Out-of-memory errors raised by the allocator.",
     lambda stats: stats.get("num_ooms")),
    ("gpu_utilization_ratio", False, "Share of the last sample period a kernel ran on the GPU (NVML).",
     lambda stats: stats[UTILIZATION] / 100.0 if UTILIZATION in stats else None),
)  # fmt: skip


class GpuMemoryCollector(Collector):
    def __init__(self, read: Callable[[], DeviceStats]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        devices = self._read()
        for name, counter, doc, value_of in FAMILIES if devices else ():
            family_type = CounterMetricFamily if counter else GaugeMetricFamily
            family = family_type(f"{PREFIX}_{name}", doc, labels=["device"])
            for device, stats in sorted(devices.items()):
                value = value_of(stats)
                if value is not None:
                    family.add_metric([str(device)], value)
            if family.samples:
                yield family


def torch_allocator_stats() -> DeviceStats:
    """Every CUDA device's allocator statistics, with NVML's utilization where it answers; {}
    without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    utilization = nvml_stats()
    return {
        index: {**torch.cuda.memory_stats(index), **_only(utilization.get(index, {}), UTILIZATION)}
        for index in range(torch.cuda.device_count())
    }


def _only(stats: Mapping[str, int], key: str) -> dict[str, int]:
    return {key: stats[key]} if key in stats else {}


@functools.cache
def _nvml() -> Any:
    """NVML, initialised once per process; None without the library or a driver."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
    except Exception:  # no library, no driver: no GPU to report
        return None
    return pynvml


def nvml_stats() -> DeviceStats:
    """Used memory and utilization per device from NVML (nvidia-ml-py); {} without a driver."""
    nvml = _nvml()
    if nvml is None:
        return {}
    devices = {}
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        devices[index] = {
            "reserved_bytes.all.current": int(nvml.nvmlDeviceGetMemoryInfo(handle).used),
            UTILIZATION: int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
        }
    return devices
