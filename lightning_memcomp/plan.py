"""Plan the largest batch each technique fits, from probe steps at two small batch sizes.

The step peak of a CNN is, to a very good approximation, a fixed part (weights, gradients, optimizer state,
workspace) plus a part per sample. :func:`plan_batch_size` runs a few training steps per method at two small
batch sizes on the target device, measures each step's peak and the memory in use at every module boundary
(forward ends, output gradients in backward), fits ``fixed + per_sample * b`` through the peaks and through
each boundary, predicts the peak at ``b`` as the highest of these lines, and returns a :class:`Plan`: per
method the fixed and per-sample bytes of the line that binds, the largest batch within the budget minus
the headroom, and the step time per sample.

How a step's peak is read:

* CUDA: ``torch.cuda.max_memory_reserved`` over the step, with the cache emptied and the peak counters reset
  at its start — what the allocator had to hold at the step's peak, allocations plus the reserve overhead
  (rounding, fragmentation), as an absolute figure (the model's state included);
* CPU: the process's peak resident set (``VmHWM``, reset per step) above the step's start, plus the bytes of
  the state that lives across steps (parameters, buffers, optimizer state, the batch). Before each step the
  C heap's free memory goes back to the system (glibc ``malloc_trim``), and while probing large freed buffers
  do too (``mallopt(M_MMAP_THRESHOLD, 64 KiB)``, restored to its default afterwards), so a step's peak does
  not hide in memory cached by earlier work of the process.

Limits of the model (see the README): memory that is not linear in the batch (cuDNN or oneDNN workspaces
chosen per shape, slicing thresholds), fragmentation at large batches, and CPU figures that depend on the
C library's allocator. The headroom covers them: 10% is the default; on CUDA with cuDNN benchmark mode or
several processes per device use more.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import gc
import math
import os
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from lightning_memcomp._lightning import Callback, move_data_to_device
from lightning_memcomp.bench.config import BenchConfig
from lightning_memcomp.bench.probes import resident_bytes, rss
from lightning_memcomp.memory.readings import peak_rss, reset_peak_rss
from lightning_memcomp.techniques import Technique, parse_technique

__all__ = ["BatchSizePlanner", "Plan", "PlanRow", "available_memory", "batch_maker", "default_probe_batches",
           "parse_budget", "plan_batch_size",
           "runtime_technique"]

MiB = 1024 * 1024
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DEFAULT_METHODS = ("baseline", "checkpoint", "quant:4", "dct:10")


def parse_budget(value: int | float | str) -> int:
    """Bytes from ``40GiB``, ``512 MiB``, ``2.5GB``, ``1e9`` or a number of bytes.

    Raises:
        ValueError: not a positive size (the message names ``budget`` and the units allowed).
    """
    if isinstance(value, bool):
        raise ValueError(f"budget={value!r} is not allowed; use bytes or a size such as '40GiB'")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"budget={value!r} is not allowed; use bytes or a size such as '40GiB', '512MiB', "
                             "'2.5GB' (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = number * _UNITS[unit]
    if not math.isfinite(size) or size <= 0:
        raise ValueError(f"budget={value!r} is not allowed; use a positive size such as '40GiB'")
    return int(size)


def _cgroup_room() -> int | None:
    """Bytes the process's cgroup still allows (limit minus usage), or ``None`` without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:
            return None
        return max(0, int(limit) - usage)
    return None


def available_memory(device: torch.device | str) -> int:
    """What a training step may use: on CUDA the device's free memory plus what this process's allocator
    already reserves; on CPU the memory available to the process (the cgroup's room when it has a limit,
    else the system's available RAM)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device))
    import psutil

    room = psutil.virtual_memory().available
    cgroup = _cgroup_room()
    return int(room if cgroup is None else min(room, cgroup))


@dataclass
class PlanRow:
    """One method of a :class:`Plan` (sizes in MiB; ``max_batch`` 0 when not even one sample fits).

    ``lines`` are the ``(fixed, per sample)`` lines whose maximum predicts the step peak (see
    :func:`plan_batch_size`); ``fixed_mib`` and ``per_sample_mib`` are the one that binds at ``max_batch``.
    """

    method: str
    fixed_mib: float | None = None
    per_sample_mib: float | None = None
    max_batch: int | None = None
    step_s_per_sample: float | None = None
    probe_batches: tuple[int, ...] = ()
    probe_peaks_mib: tuple[float, ...] = ()
    status: str = "ok"
    lines: tuple[tuple[float, float], ...] = ()

    def predicted_peak_mib(self, batch: int) -> float | None:
        lines = self.lines or ((self.fixed_mib, self.per_sample_mib),)
        if any(v is None for line in lines for v in line):
            return None
        return max(fixed + slope * batch for fixed, slope in lines)


@dataclass
class Plan:
    """The result of :func:`plan_batch_size`: one :class:`PlanRow` per method, and what it was planned for."""

    rows: list[PlanRow]
    budget_bytes: int
    headroom: float
    device: str
    reading: str
    notes: list[str] = field(default_factory=list)

    @property
    def usable_bytes(self) -> float:
        return self.budget_bytes * (1.0 - self.headroom)

    def row(self, method: str) -> PlanRow:
        name = parse_technique(method).spec
        for row in self.rows:
            if row.method == name:
                return row
        raise KeyError(f"method {method!r} is not in this plan; planned: {', '.join(r.method for r in self.rows)}")

    def max_batch(self, method: str) -> int | None:
        return self.row(method).max_batch

    def to_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]

    def table(self) -> str:
        head = ("method", "fixed MiB", "per sample MiB", "max batch", "step s/sample", "probes (batch: peak MiB)")
        body = []
        for r in self.rows:
            if r.status != "ok":
                body.append((r.method, "-", "-", "-", "-", r.status))
                continue
            probes = ", ".join(f"{b}: {p:.1f}" for b, p in zip(r.probe_batches, r.probe_peaks_mib))
            body.append((r.method, f"{r.fixed_mib:.1f}", f"{r.per_sample_mib:.2f}", str(r.max_batch),
                         f"{r.step_s_per_sample:.4f}" if r.step_s_per_sample is not None else "-", probes))
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) if i in (0, 5) else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
        lines.append("  ".join("-" * w for w in widths))
        for row in body:
            lines.append("  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(row, widths))))
        lines.append(f"\nbudget {self.budget_bytes / MiB:,.0f} MiB on {self.device}, headroom {self.headroom:.0%}: "
                     f"max batch = the largest b with fixed + per_sample * b <= {self.usable_bytes / MiB:,.0f} MiB")
        lines.append(f"step peak: {self.reading}")
        lines.extend(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def figure(self, largest: int | None = None) -> Any:
        """Predicted step peak against batch size per method, the budget line and the measured probes."""
        import matplotlib

        if os.environ.get("MPLBACKEND") is None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows if r.status == "ok"]
        top = largest or max([r.max_batch or 1 for r in rows] + [max(r.probe_batches) for r in rows] + [1])
        top = max(2, int(top * 1.15))
        fig, ax = plt.subplots(figsize=(8, 5))
        xs = [top * i / 200 for i in range(201)]
        for r in rows:
            line, = ax.plot(xs, [r.predicted_peak_mib(x) for x in xs], label=f"{r.method} (max batch {r.max_batch})")
            ax.plot(r.probe_batches, r.probe_peaks_mib, "o", color=line.get_color())
        ax.axhline(self.budget_bytes / MiB, color="black", linestyle="-", label="budget")
        ax.axhline(self.usable_bytes / MiB, color="black", linestyle="--",
                   label=f"budget - {self.headroom:.0%} headroom")
        ax.set_xlabel("batch size")
        ax.set_ylabel("step peak (MiB)")
        ax.set_title(f"Predicted step peak per technique ({self.device}; dots: measured probe steps)")
        ax.set_xlim(0, top)
        ax.set_ylim(0, max(self.budget_bytes / MiB * 1.1, *(r.predicted_peak_mib(top) or 0 for r in rows)))
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return fig


# -- probing ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: the figures are what that allocator gives
        return None


def _trim() -> None:
    """Give the C heap's free memory back to the system (glibc ``malloc_trim``), so that the resident set is
    what is alive and a step that reuses freed heap memory shows it as growth."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def free_heap_bytes() -> int | None:
    """Free bytes in the C heap (glibc ``mallinfo2().fordblks``), ``None`` where that cannot be read."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None

    class _Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = _Mallinfo2
    return int(libc.mallinfo2().fordblks)


#: free C heap above which CPU figures may come out high (see :func:`plan_batch_size`)
FRAGMENTED_HEAP_BYTES = 256 * MiB


@contextlib.contextmanager
def _freed_memory_returned(cpu: bool) -> Iterator[None]:
    """On CPU with glibc, large freed buffers go back to the system while probing (then the default again)."""
    libc = _libc() if cpu else None
    m_mmap_threshold = -3
    if libc is not None:
        libc.mallopt(m_mmap_threshold, 64 * 1024)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(m_mmap_threshold, 128 * 1024)


@contextlib.contextmanager
def _rng_kept(device: torch.device) -> Iterator[None]:
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)


def _detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without its Trainer reference (a LightningModule's ``_trainer``)."""
    saved = {}
    for attr in ("_trainer", "_fabric"):
        if getattr(model, attr, None) is not None:
            saved[attr] = getattr(model, attr)
            setattr(model, attr, None)
    try:
        return copy.deepcopy(model)
    finally:
        for attr, value in saved.items():
            setattr(model, attr, value)


def _tensors(batch: Any) -> list[Tensor]:
    return [t for t in tree_leaves(batch) if isinstance(t, Tensor)]


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The LightningModule's first optimizer (``configure_optimizers``), else SGD with momentum."""
    configure = getattr(model, "configure_optimizers", None)
    found = None
    if callable(configure):
        with contextlib.suppress(Exception):
            found = configure()
    stack = [found]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.optim.Optimizer):
            return item
        if isinstance(item, Mapping):
            stack.append(item.get("optimizer"))
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)


def _loss(model: nn.Module, batch: Any, loss_fn: Callable[[Tensor, Tensor], Tensor] | None) -> Tensor:
    step = getattr(model, "training_step", None)
    if loss_fn is None and callable(step):
        out = step(batch, 0)
        return out["loss"] if isinstance(out, Mapping) else out
    inputs, targets = batch
    return (loss_fn or nn.functional.cross_entropy)(model(inputs), targets)


def _spatial_dims(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            return 3
        if isinstance(module, nn.Conv1d):
            return 1
    return 2


class _Prober:
    """One method applied to a copy of the model, with its optimizer, measuring step peaks and times."""

    def __init__(self, model: nn.Module, technique: Technique, device: torch.device, options: BenchConfig,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None) -> None:
        from lightning_memcomp.bench.prepare import apply_method

        self.device = device
        self.model = _detached_copy(model).to(device).train()
        self.engine: Any = None
        self.autocast = False
        for method in technique.methods:  # conversions first (the spec's order puts them there), one codec
            applied = apply_method(self.model, method, options, spatial_dims=_spatial_dims(self.model))
            self.engine = applied.engine or self.engine
            self.autocast = self.autocast or applied.autocast
        self.optimizer = _optimizer(self.model)
        self.loss_fn = loss_fn

    def step(self, batch: Any) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if self.engine is not None:
                stack.enter_context(self.engine)
            if self.autocast:
                stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
            loss = _loss(self.model, batch, self.loss_fn)
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _reading(self) -> int:
        return torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else rss()

    @contextlib.contextmanager
    def _timeline(self) -> Iterator[list[int]]:
        """Memory in use (reserved on CUDA, resident on CPU) at the end of each leaf module's forward and when
        its output's gradient is computed in backward: the same points, in the same order, at any batch."""
        samples: list[int] = []

        def after_forward(module: nn.Module, args: Any, output: Any) -> None:
            samples.append(self._reading())
            if isinstance(output, Tensor) and output.requires_grad:
                output.register_hook(lambda grad: samples.append(self._reading()))

        handles = [m.register_forward_hook(after_forward) for m in self.model.modules() if not any(m.children())]
        try:
            yield samples
        finally:
            for handle in handles:
                handle.remove()

    def measured_step(self, batch: Any) -> tuple[int, float, list[int]]:
        """(step peak in bytes, seconds, the timeline) of one training step, read as the module docstring says;
        the timeline's readings count the same things as the peak."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            with self._timeline() as samples:
                seconds = self.step(batch)
            return int(torch.cuda.max_memory_reserved(self.device)), seconds, samples
        _trim()
        start = rss()
        if not reset_peak_rss():
            raise RuntimeError("the step peak on CPU needs /proc/self/clear_refs (Linux)")
        with self._timeline() as samples:
            seconds = self.step(batch)
        peak = peak_rss()
        assert peak is not None
        # gradients are freed at each step's start (set to None), so the peak above the start counts them
        state = resident_bytes(self.model, self.optimizer, *_tensors(batch))
        return int(peak - start + state), seconds, [s - start + state for s in samples]


def default_probe_batches(model: nn.Module, make_batch: Callable[[int], Any], device: torch.device,
                          loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> tuple[int, int]:
    """Probe batches ``(b, 2b)`` large enough that the largest convolution's backward already runs in several
    slices there, as it does at large batches.

    While activations are compressed, a convolution's backward works through the batch ``conv_chunk_bytes``
    (input plus output gradient; 4 MiB on CPU, 64 MiB on CUDA) at a time; a batch that fits one slice takes
    the plain path instead (the whole input decoded, and on CPU oneDNN's full-size reorders), a cost per
    sample that large batches do not pay. ``b`` is the smallest power of two at which the largest convolution
    makes four slices (at least 2, at most 64); measured with one forward at batch 1 on a copy of the model.
    """
    from lightning_memcomp.memory.lean_conv import DEFAULT_CONV_CHUNK_BYTES

    chunk = DEFAULT_CONV_CHUNK_BYTES.get(device.type, DEFAULT_CONV_CHUNK_BYTES["cuda"])
    copy_ = _detached_copy(model).to(device)
    largest = [0]

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
            size = (args[0].numel() + output.numel()) * output.element_size()
            largest[0] = max(largest[0], size)

    handles = [m.register_forward_hook(hook) for m in copy_.modules()
               if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _loss(copy_, move_data_to_device(make_batch(1), device), loss_fn)
    finally:
        for handle in handles:
            handle.remove()
        del copy_
    b = 2
    while largest[0] and b * largest[0] < 4 * chunk and b < 64:
        b *= 2
    return b, 2 * b


def _fit(batches: Sequence[int], peaks: Sequence[float]) -> tuple[float, float]:
    """Least squares ``peak = fixed + per_sample * batch`` (exact for two points); the slope is at least 0."""
    n = len(batches)
    mean_b, mean_p = sum(batches) / n, sum(peaks) / n
    var = sum((b - mean_b) ** 2 for b in batches)
    slope = sum((b - mean_b) * (p - mean_p) for b, p in zip(batches, peaks)) / var
    slope = max(slope, 0.0)
    return mean_p - slope * mean_b, slope


def plan_batch_size(
    model: nn.Module,
    make_batch: Callable[[int], Any],
    methods: Sequence[str] = DEFAULT_METHODS,
    budget: int | float | str | None = None,
    headroom: float = 0.1,
    *,
    probe_batches: Sequence[int] | None = None,
    steps: int = 2,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    device: torch.device | str | None = None,
    checkpoint_modules: Sequence[str] | None = None,
    csg_code_size: int = 128,
) -> Plan:
    """Plan the largest batch each method fits within ``budget``, from probe steps at small batch sizes.

    Args:
        model: a ``LightningModule`` (its ``training_step`` gives the loss, its ``configure_optimizers`` the
            optimizer) or a plain module (``loss_fn(model(inputs), targets)``, cross-entropy by default; SGD
            with momentum). It is not changed: each method runs on a deep copy, and the random number
            generators are restored afterwards.
        make_batch: ``make_batch(b)`` returns a batch of ``b`` samples as the training step takes it
            (``(inputs, targets)`` for a plain module).
        methods: technique specs as ``memcomp fit --technique`` takes them (``baseline``, ``checkpoint``,
            ``quant:4``, ``dct:10``, ``bf16``, ``bandlimit:50``, ``csg``, ``csg+quant:4``, ...).
        budget: bytes, or a size such as ``"40GiB"``; default :func:`available_memory` of the device (on CPU
            plus the model's own state, which the step peak counts and which is already resident).
        headroom: the fraction of the budget kept free (``0 <= headroom < 1``).
        probe_batches: the batch sizes probed (two or more, increasing); a later one is probed only when the
            line through the earlier ones says it fits in the budget. Default :func:`default_probe_batches`.
        steps: measured steps per probe batch (after one warm-up step); the largest peak counts.
        device: where to probe (default: the model's device).
        checkpoint_modules: the blocks the ``checkpoint`` method checkpoints (default: ``*Block``,
            ``*Bottleneck``, MONAI ``ResidualUnit``).
        csg_code_size: the code size of the ``csg``/``bcsg`` methods.

    Returns:
        a :class:`Plan`; a method that cannot run on this model (e.g. ``checkpoint`` without blocks) gets a
        row whose ``status`` says why.

    Raises:
        ValueError: a bad method spec, budget, headroom, probe batch list or step count (the message names
            the option, the value and what is allowed), or a first probe that does not fit in the budget.
    """
    parsed = [parse_technique(m) for m in methods]
    if not parsed:
        raise ValueError("methods=[] names no method; give method specs such as 'baseline', 'quant:4'")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom={headroom!r} is not allowed; use a fraction in [0, 1)")
    if probe_batches is not None:
        probes = [int(b) for b in probe_batches]
        if len(probes) < 2 or any(b < 1 for b in probes) or probes != sorted(set(probes)):
            raise ValueError(f"probe_batches={tuple(probe_batches)!r} is not allowed; use two or more increasing "
                             "batch sizes >= 1, e.g. (4, 8)")
    if steps < 1:
        raise ValueError(f"steps={steps!r} is not allowed; use 1 or more")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if probe_batches is None:
        with _rng_kept(device):
            probes = list(default_probe_batches(model, make_batch, device, loss_fn))
    cpu = device.type == "cpu"
    if budget is None:
        budget_bytes = available_memory(device)
        if cpu:
            budget_bytes += resident_bytes(model)
    else:
        budget_bytes = parse_budget(budget)
    usable = budget_bytes * (1 - headroom)
    options = BenchConfig(network="custom", checkpoint_modules=tuple(checkpoint_modules) if checkpoint_modules
                          else None, csg_code_size=csg_code_size)
    rows: list[PlanRow] = []
    free_heap = free_heap_bytes() if cpu else None
    with _rng_kept(device), _freed_memory_returned(cpu), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in parsed:
            rows.append(_plan_method(model, make_batch, method, device, options, loss_fn, probes, steps, usable,
                                     budget_bytes))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    notes = []
    if free_heap is not None and free_heap > FRAGMENTED_HEAP_BYTES:
        notes.append(f"note: this process held {free_heap / MiB:,.0f} MiB of free C heap from earlier work; a "
                     "step can reuse it in scattered pieces, so the CPU figures may come out higher (more "
                     "cautious) than in a fresh process (memcomp plan, or plan before loading data)")
    reading = ("torch.cuda.max_memory_reserved over the step (cache emptied, counters reset at its start)"
               if device.type == "cuda" else
               "process peak resident set (VmHWM) above the step's start, plus the state kept across steps")
    return Plan(rows, budget_bytes, headroom, str(device), reading, notes)


def _plan_method(model: nn.Module, make_batch: Callable[[int], Any], method: Technique, device: torch.device,
                 options: BenchConfig, loss_fn: Any, probes: list[int], steps: int, usable: float,
                 budget: float) -> PlanRow:
    row = PlanRow(method.spec)
    torch.manual_seed(0)
    try:
        prober = _Prober(model, method, device, options, loss_fn)
    except ValueError as err:  # e.g. checkpoint on a model without blocks
        row.status = f"not applicable: {err}"
        return row
    batches: list[int] = []
    peaks: list[float] = []
    times: list[float] = []
    timelines: list[list[int]] = []
    for b in probes:  # a probe runs only when it cannot exceed the budget (the headroom may be used)
        if len(batches) >= 2:
            if max(f + s * b for f, s in _lines(batches, peaks, timelines)) > budget:
                break  # the lines say this probe would not fit: plan from the probes so far
        elif batches and peaks[0] * b / batches[0] > budget:
            break  # peak(b) <= peak(b1) * b / b1 while the fixed part is positive
        batch = move_data_to_device(make_batch(b), device)
        prober.step(batch)  # warm-up: allocator pools, kernel choices, the codec's first-use work
        measured = [prober.measured_step(batch) for _ in range(steps)]
        peak = max(p for p, _, _ in measured)
        lengths = {len(t) for _, _, t in measured}
        timelines.append([max(points) for points in zip(*(t for _, _, t in measured))] if len(lengths) == 1
                         else [])
        if not batches and peak > usable:
            raise ValueError(f"the first probe, batch {b} with {method.spec}, already needs {peak / MiB:,.1f} MiB, "
                             f"more than the budget less headroom ({usable / MiB:,.1f} MiB); give smaller "
                             "probe_batches or a larger budget")
        batches.append(b)
        peaks.append(float(peak))
        times.append(statistics.median(s for _, s, _ in measured) / b)
        del batch
    if len(batches) < 2:
        row.status = f"only batch {batches[0]} fits: no second probe to fit a line through"
        row.probe_batches, row.probe_peaks_mib = tuple(batches), tuple(p / MiB for p in peaks)
        row.max_batch = batches[0]
        return row
    lines = _lines(batches, peaks, timelines)
    fits = [(int((usable - f) // s) if s > 0 else None, f, s) for f, s in lines]
    bounded = [fit for fit in fits if fit[0] is not None]
    most, fixed, slope = min(bounded) if bounded else (None, *lines[0])
    row.max_batch = max(most, 0) if most is not None else None
    row.fixed_mib, row.per_sample_mib = fixed / MiB, slope / MiB
    row.lines = tuple((f / MiB, s / MiB) for f, s in lines)
    row.step_s_per_sample = times[-1]
    row.probe_batches, row.probe_peaks_mib = tuple(batches), tuple(p / MiB for p in peaks)
    return row


def _lines(batches: Sequence[int], peaks: Sequence[float], timelines: Sequence[Sequence[int]]
           ) -> list[tuple[float, float]]:
    """The lines whose maximum predicts the step peak: the line through the probes' peaks, and one line per
    point of the timeline (the same module boundary at every probe batch), kept where it is the highest at
    some batch beyond the probes. Where the step peak moves from one phase of the step to another as the
    batch grows (e.g. from a part with a fixed workspace to one that grows faster per sample), the peak is
    convex in the batch and the lines of the timeline catch the steeper phase that the peaks alone miss."""
    lines = [_fit(batches, peaks)]
    if timelines and all(len(t) == len(timelines[0]) and t for t in timelines):
        lines += [_fit(batches, [t[i] for t in timelines]) for i in range(len(timelines[0]))]
    # the upper envelope beyond the largest probe: a line under another one at both ends of that range is
    # under it everywhere there
    start, far = max(batches), max(batches) * 1024
    unique = sorted(set(lines), key=lambda line: line[1])
    return [line for line in unique
            if not any(other != line and other[0] + other[1] * start >= line[0] + line[1] * start
                       and other[0] + other[1] * far >= line[0] + line[1] * far for other in unique)]


# -- the callback --------------------------------------------------------------------------------
def runtime_technique(trainer: Any) -> str:
    """The part of a Trainer's technique that acts at run time: its activation codec (``ActivationCompression``
    callback or ``memcomp`` strategy) and bf16 autocast. Conversions (CSG, band-limiting) and
    ``ActivationCheckpointing`` are already in the model by ``on_fit_start``; ``baseline`` when nothing else."""
    from lightning_memcomp.techniques import _codec_default

    parts = []
    for source in (*trainer.callbacks, trainer.strategy):
        if type(source).__name__ == "ActivationCompression":
            codec, options = source.codec, source.options
        elif hasattr(source, "memcomp_codec"):
            codec, options = source.memcomp_codec, source.memcomp_options
        else:
            continue
        if not isinstance(codec, str):
            raise ValueError(f"BatchSizePlanner: codec {codec!r} is an instance; the planner probes codecs by name")
        option = "bits" if codec in ("quant", "blpa") else "compression_ratio"
        value = options.get(option, _codec_default(codec, option))
        parts.append(f"{codec}:{value:g}" if isinstance(value, (int, float)) else codec)
        break
    if "bf16" in str(getattr(trainer, "precision", "")):
        parts.append("bf16")
    return "+".join(parts) or "baseline"


def batch_maker(datamodule: Any) -> Callable[[int], Any]:
    """``make_batch(b)`` from a DataModule's training data: ``b`` samples of its train dataset, collated by
    its train dataloader's ``collate_fn`` (samples repeat when the dataset is smaller than ``b``)."""
    loader = datamodule.train_dataloader()
    dataset, collate = loader.dataset, loader.collate_fn
    if collate is None:
        from torch.utils.data import default_collate as collate

    def make_batch(b: int) -> Any:
        return collate([dataset[i % len(dataset)] for i in range(b)])

    return make_batch


class BatchSizePlanner(Callback):
    """Set the data module's batch size, before fit, to the largest batch the technique in use fits.

    The counterpart of Lightning's ``BatchSizeFinder``: instead of doubling the batch until an out-of-memory
    error, it probes two small batches (:func:`plan_batch_size`) with the run's own technique — the model as
    the technique callbacks converted it, its activation codec, bf16 — and the baseline for comparison, then
    sets ``batch_size`` (``lightning_setattr``: the DataModule, the model or their ``hparams``) and logs the
    plan (``plan/*`` metrics and the table). Probing runs on deep copies: the model, the optimizers and the
    random number generators are as they were.

    Args:
        budget: bytes or a size such as ``"40GiB"`` (default: what the device has available).
        headroom: the fraction of the budget kept free.
        probe_batches: the probed batch sizes.
        steps: measured steps per probe.
        max_batch: an upper bound on the batch set (e.g. the dataset size).
        attr_name: the batch-size attribute to set.
        compare_baseline: also plan the baseline (shown in the table and logged as ``plan/baseline_max_batch``).

    Raises:
        ValueError: at fit start, when the plan leaves no batch that fits, or ``attr_name`` is nowhere to set.
    """

    def __init__(self, budget: int | float | str | None = None, headroom: float = 0.1,
                 probe_batches: Sequence[int] | None = None, steps: int = 2, max_batch: int | None = None,
                 attr_name: str = "batch_size", compare_baseline: bool = True) -> None:
        if budget is not None:
            parse_budget(budget)
        if not 0 <= headroom < 1:
            raise ValueError(f"headroom={headroom!r} is not allowed; use a fraction in [0, 1)")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} is not allowed; use a positive batch size or None")
        self.budget = budget
        self.headroom = headroom
        self.probe_batches = tuple(probe_batches) if probe_batches is not None else None
        self.steps = steps
        self.max_batch = max_batch
        self.attr_name = attr_name
        self.compare_baseline = compare_baseline
        #: the plan made at fit start, and the batch size set
        self.plan: Plan | None = None
        self.batch_size: int | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        from lightning_memcomp._lightning import lightning_hasattr, lightning_setattr

        if not lightning_hasattr(pl_module, self.attr_name):
            raise ValueError(f"BatchSizePlanner: attr_name={self.attr_name!r} is neither on the model, its "
                             "DataModule nor their hparams; give the attribute that holds the batch size")
        datamodule = trainer.datamodule
        make_batch = batch_maker(datamodule if datamodule is not None else pl_module)
        technique = runtime_technique(trainer)
        methods = [technique] + (["baseline"] if self.compare_baseline and technique != "baseline" else [])
        self.plan = plan_batch_size(pl_module, make_batch, methods, budget=self.budget, headroom=self.headroom,
                                    probe_batches=self.probe_batches, steps=self.steps, device=pl_module.device)
        planned = self.plan.max_batch(technique)
        if not planned:
            raise ValueError(f"BatchSizePlanner: with {technique} not even one sample fits in "
                             f"{self.plan.usable_bytes / MiB:,.0f} MiB (budget less headroom)\n{self.plan}")
        self.batch_size = min(planned, self.max_batch) if self.max_batch else planned
        lightning_setattr(pl_module, self.attr_name, self.batch_size)
        row = self.plan.row(technique)
        metrics = {"plan/batch_size": float(self.batch_size), "plan/max_batch": float(planned),
                   "plan/fixed_mib": row.fixed_mib or 0.0, "plan/per_sample_mib": row.per_sample_mib or 0.0}
        if len(methods) > 1 and self.plan.max_batch("baseline"):
            metrics["plan/baseline_max_batch"] = float(self.plan.max_batch("baseline"))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            print(f"BatchSizePlanner: {self.attr_name} = {self.batch_size} for {technique}\n{self.plan}")


# -- memcomp plan --------------------------------------------------------------------------------
def build_parser() -> Any:
    from lightning_memcomp.short_errors import ShortArgumentParser
    from lightning_memcomp.techniques import technique_help

    parser = ShortArgumentParser(
        prog="memcomp plan",
        description="The largest batch each technique fits on this device, predicted from probe steps at two "
                    "small batch sizes on a recipe config's model and data. Other options (e.g. "
                    "--data.init_args.size=64) go to the config as in memcomp fit.",
    )
    parser.add_argument("--config", required=True, help="a shipped config name (memcomp configs) or a path")
    parser.add_argument("--technique", action="append", default=[],
                        help=f"a technique to plan besides the baseline and the config's own (repeatable): "
                             f"{technique_help()}")
    parser.add_argument("--methods", default=None,
                        help="comma-separated techniques to plan instead of baseline + the config's + --technique")
    parser.add_argument("--budget", default=None, help="memory budget, e.g. 40GiB (default: what the device has)")
    parser.add_argument("--headroom", type=float, default=0.1, help="fraction of the budget kept free")
    parser.add_argument("--probe-batches", default=None,
                        help="comma-separated batch sizes to probe (two or more, increasing; default: the smallest "
                             "(b, 2b) at which the convolutions' compressed inputs are decoded in slices)")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per probe batch")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to probe")
    parser.add_argument("--out", default="memcomp_plan", help="base name of the PNG and CSV written")
    return parser


def _recipe(config: str, extra: list[str]) -> tuple[Any, Any, dict[str, Any]]:
    """The model and DataModule of a config (with ``extra`` overrides), and the config as a dict."""
    import yaml

    from lightning_memcomp.cli import MemcompCLI
    from lightning_memcomp.configs import resolve_config

    path = resolve_config(config)
    cli = MemcompCLI(args=["--config", path, "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                           *extra], run=False)
    spec = yaml.safe_load(Path(path).read_text()) or {}
    return cli.model, cli.datamodule, spec


def main(argv: Sequence[str] | None = None) -> int:
    """``memcomp plan``: print the plan of a recipe config and write its figure and CSV; returns the exit status."""
    import csv

    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv or []))
    probes = [int(p) for p in args.probe_batches.split(",") if p.strip()] if args.probe_batches else None
    from lightning_memcomp.techniques import technique_of

    model, datamodule, spec = _recipe(args.config, extra)
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    else:
        methods = list(dict.fromkeys(["baseline", technique_of(spec).replace(" (strategy)", ""), *args.technique]))
    code_size = next((cb.get("init_args", {}).get("code_size") for cb in spec.get("trainer", {}).get("callbacks", [])
                      if str(cb.get("class_path", "")).endswith("ConvSliceGeneration")), None) or 128
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    datamodule.prepare_data()
    datamodule.setup("fit")
    t0 = time.perf_counter()
    plan = plan_batch_size(model, batch_maker(datamodule), methods, budget=args.budget, headroom=args.headroom,
                           probe_batches=probes, steps=args.steps, device=device, csg_code_size=code_size)
    seconds = time.perf_counter() - t0
    plan.notes.append(f"planned {len(methods)} techniques in {seconds:.1f} s (config {args.config})")
    print(plan.table())
    out = Path(args.out[:-4] if args.out.endswith((".png", ".csv")) else args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(plan.to_dicts()[0]))
        writer.writeheader()
        writer.writerows(plan.to_dicts())
    figure = plan.figure()
    figure.savefig(out.with_suffix(".png"), dpi=100)
    print(f"\nwrote {out.with_suffix('.csv')}\nwrote {out.with_suffix('.png')}")
    return 0
