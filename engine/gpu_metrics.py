"""GPU memory metrics, exported only while a CUDA device is in use (absent, not zero, on CPU).

From torch's caching allocator (`torch.cuda.memory_stats`, for runtimes that allocate through
torch): reserved and allocated bytes and the fragmentation ratio, inactive_split_bytes /
reserved_bytes, the share of reserved memory held in split blocks that no live tensor uses,
which a long mixed-length load grows. From NVML for runtimes whose memory torch does not see
(ONNX Runtime's CUDA arena, TensorRT): used bytes as reserved; no fragmentation (NVML cannot see
inside an allocator).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.metrics import PREFIX

# device index -> torch.cuda.memory_stats(device) (the keys used below), or NVML's numbers.
DeviceStats = Mapping[int, Mapping[str, int]]


def fragmentation_ratio(stats: Mapping[str, int]) -> float | None:
    reserved = stats.get("reserved_bytes.all.current", 0)
    inactive_split = stats.get("inactive_split_bytes.all.current")
    if inactive_split is None or reserved <= 0:
        return None
    return inactive_split / reserved


class GpuMemoryCollector(Collector):
    def __init__(self, read: Callable[[], DeviceStats]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        devices = self._read()
        if not devices:
            return
        reserved = GaugeMetricFamily(
            f"{PREFIX}_gpu_memory_reserved_bytes", "Memory the GPU allocator holds.", labels=["device"]
        )
        allocated = GaugeMetricFamily(
            f"{PREFIX}_gpu_memory_allocated_bytes", "Memory in live tensors.", labels=["device"]
        )
        fragmentation = GaugeMetricFamily(
            f"{PREFIX}_gpu_memory_fragmentation_ratio",
            "inactive_split_bytes / reserved_bytes of the caching allocator.",
            labels=["device"],
        )
        for device, stats in sorted(devices.items()):
            label = [str(device)]
            reserved.add_metric(label, stats.get("reserved_bytes.all.current", 0))
            if "allocated_bytes.all.current" in stats:
                allocated.add_metric(label, stats["allocated_bytes.all.current"])
            ratio = fragmentation_ratio(stats)
            if ratio is not None:
                fragmentation.add_metric(label, ratio)
        yield reserved
        if allocated.samples:
            yield allocated
        if fragmentation.samples:
            yield fragmentation


def torch_allocator_stats() -> DeviceStats:
    """Every CUDA device's allocator statistics; {} without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    return {index: torch.cuda.memory_stats(index) for index in range(torch.cuda.device_count())}


def nvml_stats() -> DeviceStats:
    """Used memory per device from NVML (nvidia-ml-py); {} without a driver."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
    except Exception:  # no library, no driver: no GPU to report
        return {}
    return {
        index: {"reserved_bytes.all.current": int(pynvml.nvmlDeviceGetMemoryInfo(
            pynvml.nvmlDeviceGetHandleByIndex(index)).used)}
        for index in range(pynvml.nvmlDeviceGetCount())
    }  # fmt: skip
