"""Step time inside a Lightning fit: a callback that times each training batch, the way :mod:`.timing` does."""

from __future__ import annotations

import time
from typing import Any

from lightning_memcomp import _lightning as pl
from lightning_memcomp.bench.timing import synchronize

__all__ = ["StepTimer"]


class StepTimer(pl.Callback):
    """Seconds of each training batch (``on_train_batch_start`` to ``on_train_batch_end``: forward, backward,
    optimizer step and every other callback's hooks in between), CUDA-synchronised; in :attr:`times`."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        synchronize(trainer.strategy.root_device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        synchronize(trainer.strategy.root_device)
        self.times.append(time.perf_counter() - self._start)
