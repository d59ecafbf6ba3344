"""Memory probes: the one way the benchmark and the scripts in ``benchmarks/`` read memory.

* :class:`MemoryProbe`: bytes in use now (``torch.cuda.memory_allocated`` on CUDA, the process's resident
  set on CPU) and the peak of a step (``torch.cuda.max_memory_allocated``, reset per step; on CPU the peak
  resident set ``VmHWM``, reset through ``/proc/self/clear_refs``, see :mod:`lightning_memcomp.memory.readings`);
* :func:`forward_memory`: what one forward pass leaves alive (memory growth, the output) and what the
  saved-tensor ledger recorded for backward;
* :func:`resident_bytes`: the state that lives across steps (parameters, buffers, optimizer state, batch);
* :func:`live_tensors`: ``torch.Tensor`` objects alive after a garbage collection (leak checks).

On CPU, read memory in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536`` (:mod:`.process`), so that freed
buffers leave the resident set.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_memcomp.bench.timing import synchronize
from lightning_memcomp.memory.readings import peak_rss, reset_peak_rss

__all__ = ["ForwardMemory", "MemoryProbe", "forward_memory", "live_tensors", "resident_bytes", "rss"]


def rss() -> int:
    """Resident set of this process in bytes (``/proc/self/statm``; psutil where there is no ``/proc``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        from lightning_memcomp.memory.readings import process_rss

        return process_rss()


class MemoryProbe:
    """Memory in use and the step peak: CUDA allocator counters, or process RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.peak_available = self.cuda or reset_peak_rss()

    def settle(self) -> None:
        """Collect garbage (and on CUDA wait for queued work), so that a reading counts only what is alive."""
        gc.collect()
        synchronize(self.device)

    def current(self) -> int:
        """Bytes in use now: ``torch.cuda.memory_allocated`` on CUDA, the resident set on CPU."""
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return rss()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.peak_available:
            reset_peak_rss()

    def peak(self, start: int, resident: int) -> int | None:
        """The step's peak: ``max_memory_allocated`` on CUDA (absolute); on CPU the peak resident set
        (``VmHWM``) above the step's start plus ``resident``, the bytes of the state that lives across
        steps (parameters, buffers, optimizer state, the batch), so both devices count the same things."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        peak = peak_rss() if self.peak_available else None
        return None if peak is None else peak - start + resident


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *tensors: Tensor) -> int:
    """Bytes of the distinct storages of parameters, buffers, optimizer state and the given tensors."""
    seen: dict[int, int] = {}
    state = [] if optimizer is None else [t for s in optimizer.state.values() for t in s.values()
                                          if isinstance(t, Tensor)]
    for t in (*model.parameters(), *model.buffers(), *state, *tensors):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@dataclass
class ForwardMemory:
    """What one forward pass left alive (see :func:`forward_memory`)."""

    #: memory in use after the forward minus before it (:meth:`MemoryProbe.current`, garbage collected)
    growth: int
    #: bytes of the output: part of ``growth``, alive after any forward but not held for backward
    output_bytes: int
    #: seconds of the forward (entering the engine included)
    forward_s: float
    #: what the engine's ledger recorded (``raw_bytes``, ``stored_bytes``, ``by_codec()``, ``by_module()``);
    #: ``None`` when the forward ran without an engine
    ledger: Any = None

    @property
    def growth_less_output(self) -> int:
        return self.growth - self.output_bytes


def forward_memory(
    model: nn.Module,
    x: Tensor,
    engine: Callable[[], AbstractContextManager[Any]] | None = None,
    *,
    warmup: Tensor | None = None,
) -> ForwardMemory:
    """Memory left alive by ``model(x)`` inside ``engine()`` (e.g. ``lambda: track_saved_tensors(model)``, or
    ``compress_activations``; ``None``: no hooks at all), on ``x``'s device.

    With ``warmup``, a forward and backward on that input inside ``engine()`` first (thread pools, allocator
    arenas, kernel caches); the gradients are then dropped. Garbage is collected before each reading.
    """
    probe = MemoryProbe(x.device)
    context = engine if engine is not None else contextlib.nullcontext
    if warmup is not None:
        with context():
            out = model(warmup)
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)
        del out
    probe.settle()
    before = probe.current()
    t0 = time.perf_counter()
    with context() as ledger:
        out = model(x)
    synchronize(x.device)
    forward_s = time.perf_counter() - t0
    probe.settle()
    growth = probe.current() - before
    output_bytes = out.numel() * out.element_size()
    del out
    return ForwardMemory(growth, output_bytes, forward_s, ledger if engine is not None else None)


def live_tensors() -> int:
    """``torch.Tensor`` objects alive after a garbage collection."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
