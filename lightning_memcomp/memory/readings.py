"""Memory readings: CUDA caching allocator, NVML device memory, process RSS."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from lightning_memcomp.memory.ledger import MiB

__all__ = ["NVMLReader", "cuda_counters", "peak_rss", "process_rss", "reset_peak_rss"]


def process_rss() -> int:
    """Resident set size of this process, in bytes."""
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set (``VmHWM``) to its current RSS (Linux: ``/proc/self/clear_refs``).

    Returns whether it could (``False`` elsewhere, or where ``/proc`` is read-only); only then does
    :func:`peak_rss` give the peak since this call.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    """The process's peak resident set (``VmHWM``) in bytes, since start or the last :func:`reset_peak_rss`;
    ``None`` where ``/proc/self/status`` does not report it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cuda_counters(device: torch.device) -> dict[str, float]:
    """Reserved, reserved-but-unallocated (MiB), allocation retries and OOMs from the caching allocator."""
    stats = torch.cuda.memory_stats(device)
    reserved = stats.get("reserved_bytes.all.current", 0)
    allocated = stats.get("allocated_bytes.all.current", 0)
    return {
        "memory/reserved_mib": reserved / MiB,
        "memory/reserved_unused_mib": (reserved - allocated) / MiB,
        "memory/alloc_retries": float(stats.get("num_alloc_retries", 0)),
        "memory/oom_count": float(stats.get("num_ooms", 0)),
    }


class NVMLReader:
    """Device memory in use as the driver sees it (all processes), through pynvml (nvidia-ml-py)."""

    def __init__(self, device: torch.device) -> None:
        self.handle: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            props = torch.cuda.get_device_properties(device)
            bus_id = getattr(props, "pci_bus_id", None)
            if bus_id is not None:
                self.handle = pynvml.nvmlDeviceGetHandleByPciBusId(str(bus_id).encode())
            else:
                index = device.index if device.index is not None else torch.cuda.current_device()
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._pynvml = pynvml
        except Exception as err:  # noqa: BLE001 - NVML is optional: say so once and go on
            warnings.warn(f"MemoryMonitor: NVML unavailable ({err}); memory/nvml_used_mib is not logged", stacklevel=2)
            self.handle = None

    def used_mib(self) -> float | None:
        if self.handle is None:
            return None
        return self._pynvml.nvmlDeviceGetMemoryInfo(self.handle).used / MiB
