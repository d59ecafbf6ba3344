"""Step time: one timed training step, rounds of steps interleaved across configurations, medians.

On a shared machine step times drift with the load, so configurations are compared by steps taken side
by side in one process (:func:`interleaved`), each the median of several rounds.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["interleaved", "median", "synchronize", "train_step"]


def synchronize(device: torch.device | None) -> None:
    """Wait for the device's queued work (CUDA only; nothing on CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer | None = None,
    context: Callable[[], AbstractContextManager[Any]] | None = None,
    *,
    device: torch.device | None = None,
    before: Callable[[], None] | None = None,
    after_forward: Callable[[Any], None] | None = None,
) -> float:
    """One training step on ``(x, y)``, cross-entropy loss; returns its seconds.

    Order: gradients zeroed (``optimizer.zero_grad`` or ``model.zero_grad``, set to ``None``), ``before()``,
    then, timed: the forward and the loss inside ``context()`` (e.g. an engine or autocast),
    ``after_forward(entered)`` with what the context yielded (its own time is left out: for memory readings),
    backward, ``optimizer.step()``. CUDA work on ``device`` is finished before and after the timed part.
    """
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    if before is not None:
        before()
    synchronize(device)
    t0 = time.perf_counter()
    with (context() if context is not None else contextlib.nullcontext()) as entered:
        loss = nn.functional.cross_entropy(model(x), y)
    paused = 0.0
    if after_forward is not None:
        tp = time.perf_counter()
        after_forward(entered)
        paused = time.perf_counter() - tp
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    synchronize(device)
    elapsed = time.perf_counter() - t0 - paused
    del loss
    return elapsed


def interleaved(steps: Mapping[str, Callable[[], float]], rounds: int, *, warmup: int = 0) -> dict[str, list[float]]:
    """Run every step once per round for ``warmup`` unrecorded rounds, then ``rounds`` recorded ones.

    Each step returns the seconds it measured (e.g. :func:`train_step`). Warm-up rounds run in the given
    order; the recorded ones turn it by one place each round (``a, b, c``; ``b, c, a``; ...; with two steps:
    ``a, b``; ``b, a``), so that no step always runs first or always follows the same one. Returns each
    step's recorded times, by name.
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        shift = (i - warmup) % len(names) if names and i >= warmup else 0
        for name in names[shift:] + names[:shift]:
            seconds = steps[name]()
            if i >= warmup:
                times[name].append(seconds)
    return times


def median(values: Iterable[float]) -> float:
    """The median, as a float."""
    return float(statistics.median(list(values)))
