"""The ``memcomp`` strategies for ``pytorch_lightning`` (see :mod:`lightning_memcomp.strategies`).

A ``pytorch_lightning.Trainer`` accepts only strategies that subclass ``pytorch_lightning``'s own classes::

    from lightning_memcomp.strategies.pytorch_lightning import DDPMemCompStrategy
    trainer = pytorch_lightning.Trainer(strategy=DDPMemCompStrategy(codec="quant", bits=4), devices=2)

or in a ``pytorch_lightning`` LightningCLI: ``--trainer.strategy=lightning_memcomp.strategies.pytorch_lightning.
DDPMemCompStrategy``. The names ``"memcomp"``, ``"ddp_memcomp"`` and ``"ddp_spawn_memcomp"`` are registered in
both packages when :mod:`lightning_memcomp.strategies` is imported.
"""

from __future__ import annotations

from lightning_memcomp.strategies import strategies_for

__all__ = ["DDPMemCompStrategy", "MemCompSingleDeviceStrategy"]

MemCompSingleDeviceStrategy, DDPMemCompStrategy = strategies_for("pytorch_lightning")
