"""Both Lightning packages: ``lightning`` (``lightning.pytorch``) and ``pytorch_lightning``.

The two packages ship the same Trainer under two import paths, and Lightning checks callbacks, loggers and
strategies with ``isinstance`` against the classes of the package the ``Trainer`` came from. Our callbacks
subclass :class:`Callback` below, which subclasses the ``Callback`` of every installed package, so one class
works under either; checks that look at a user's objects (loggers, strategies) use the tuples here, which
hold the matching class of every installed package.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

#: the import names of the two packages, in the order we prefer them
PACKAGE_NAMES = ("lightning.pytorch", "pytorch_lightning")


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


#: the installed Lightning packages (``lightning.pytorch`` first), at least one
PACKAGES: tuple[ModuleType, ...] = tuple(m for m in map(_import, PACKAGE_NAMES) if m is not None)
if not PACKAGES:
    raise ImportError(
        "lightning_memcomp needs a Lightning package: neither `lightning` nor `pytorch_lightning` is installed; "
        "install one (`pip install lightning` or `pip install pytorch-lightning`)"
    )

#: the package used where any will do (annotations, Trainer-independent utilities)
pl = PACKAGES[0]
Trainer = pl.Trainer
LightningModule = pl.LightningModule
LightningDataModule = pl.LightningDataModule


def classes(module: str, name: str) -> tuple[type, ...]:
    """``name`` from ``<package>.<module>`` of every installed package: ``classes("loggers", "TensorBoardLogger")``."""
    found = []
    for package in PACKAGES:
        sub = _import(f"{package.__name__}.{module}")
        cls = getattr(sub, name, None) if sub is not None else None
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def package_of(obj: Any) -> ModuleType:
    """The installed Lightning package that ``obj``'s class (a Trainer, LightningModule, strategy...) comes from."""
    for cls in type(obj).__mro__:
        for package in PACKAGES:
            if cls.__module__ == package.__name__ or cls.__module__.startswith(package.__name__ + "."):
                return package
    raise TypeError(f"{type(obj).__qualname__} comes from neither `lightning` nor `pytorch_lightning`")


class Callback(*(package.Callback for package in PACKAGES)):  # type: ignore[misc]
    """A Lightning callback accepted by the Trainer of every installed Lightning package.

    It subclasses ``lightning.pytorch.Callback`` and ``pytorch_lightning.Callback`` (those installed); both
    define the same hooks with the same no-op defaults, so the order only decides which no-op runs.
    """


#: ``TensorBoardLogger`` of every installed package, for ``isinstance``
TensorBoardLoggers: tuple[type, ...] = classes("loggers", "TensorBoardLogger")
#: strategies that shard parameters (the weights a layer sees are gathered on the fly)
ShardedStrategies: tuple[type, ...] = (
    classes("strategies", "FSDPStrategy")
    + classes("strategies", "DeepSpeedStrategy")
    + classes("strategies", "ModelParallelStrategy")
)

#: why activation compression refuses them: a sharded strategy gathers each layer's weights just before its
#: forward into fresh storage that is no parameter, so the engine would encode the weights as activations
SHARDED_WEIGHTS_ARE_ACTIVATIONS = (
    "the weights it gathers for each forward are new tensors, not the parameters, and would be encoded like "
    "activations (backward would read rounded weights); use strategy='ddp_memcomp' or strategy='ddp'"
)


def reject_sharded(trainer: Any, who: str, why: str = SHARDED_WEIGHTS_ARE_ACTIVATIONS) -> None:
    """Raise if ``trainer`` runs a strategy that shards parameters (FSDP, DeepSpeed, ModelParallel) of either package.

    Raises:
        RuntimeError: naming ``who``, the strategy and ``why``.
    """
    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, ShardedStrategies):
        raise RuntimeError(f"{who} does not support strategy={type(strategy).__name__}: {why}")


# the same functions in both packages (lightning_utilities' and Fabric's), whichever is installed
rank_zero_info = pl.utilities.rank_zero_info
rank_zero_warn = pl.utilities.rank_zero_warn
_fabric = "lightning.fabric" if pl.__name__ == "lightning.pytorch" else "lightning_fabric"
move_data_to_device = importlib.import_module(f"{_fabric}.utilities.apply_func").move_data_to_device
_parsing = importlib.import_module(f"{pl.__name__}.utilities.parsing")
lightning_hasattr = _parsing.lightning_hasattr
lightning_setattr = _parsing.lightning_setattr

__all__ = [
    "PACKAGES",
    "Callback",
    "LightningDataModule",
    "LightningModule",
    "ShardedStrategies",
    "TensorBoardLoggers",
    "Trainer",
    "classes",
    "lightning_hasattr",
    "lightning_setattr",
    "move_data_to_device",
    "package_of",
    "rank_zero_info",
    "reject_sharded",
    "rank_zero_warn",
]
