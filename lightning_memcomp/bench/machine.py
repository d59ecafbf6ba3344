"""The machine a figure was measured on: the header of every results file."""

from __future__ import annotations

import datetime as _dt
import os
import platform

import torch

__all__ = ["machine_info", "machine_summary"]


def machine_info(device: torch.device | None = None) -> dict[str, str]:
    """CPU model, core count, torch version, GPU (or that none was there), date: the results' header."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (no CUDA device available)"
    try:
        load = " / ".join(f"{v:.1f}" for v in os.getloadavg()) + " (1/5/15 min)"
    except OSError:
        load = "unknown"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": gpu,
        "device": str(device) if device is not None else "",
        "load": load,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }



def machine_summary(info: dict[str, str] | None = None, *, load: bool = False) -> str:
    """One line for a results file: CPU, cores, torch, Python, GPU, date (and the load average with ``load``)."""
    info = info or machine_info()
    text = (f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, Python {info['python']}; "
            f"GPU: {info['gpu']}; {info['date']}")
    return text + (f"; load average {info['load']}" if load else "")
