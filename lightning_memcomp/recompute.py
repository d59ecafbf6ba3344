"""Activation checkpointing over a network's blocks, as a function and as a Lightning callback.

The alternative every memory technique is compared against: a selected block keeps only its inputs for
backward and recomputes its inside when backward reaches it (``torch.utils.checkpoint``, non-reentrant).
:func:`checkpoint_forward` patches the blocks' ``forward`` in place, so parameter names, the state dict and
checkpoints stay those of the plain model; :class:`ActivationCheckpointing` does it at ``setup`` (the
``checkpoint`` technique of ``memcomp fit --technique``).
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_memcomp import _lightning as pl
from lightning_memcomp._lightning import Callback
from lightning_memcomp.surgery import ModuleSelection, module_filter

__all__ = ["ActivationCheckpointing", "checkpoint_forward", "is_block", "select_blocks"]

_PATCHED = "_memcomp_checkpointed_forward"


def is_block(module: nn.Module, name: str = "") -> bool:
    """The default selection: classes named ``*Block``/``*Bottleneck`` (ResNet, DenseNet), MONAI's
    ``ResidualUnit`` (each UNet level's convolutions) and DenseNet's ``_DenseLayer``."""
    cls = type(module).__name__
    return cls.endswith("Block") or cls.endswith("Bottleneck") or cls in ("ResidualUnit", "_DenseLayer")


def select_blocks(model: nn.Module, modules: ModuleSelection = None, *, option: str = "modules") -> list[str]:
    """Qualified names of the outermost modules of ``model`` that ``modules`` selects (default :func:`is_block`).

    Raises:
        ValueError: the selection matched no module (the message names ``option`` and its value).
    """
    select = module_filter(modules, is_block, option=option)
    chosen: list[str] = []
    for name, module in model.named_modules():
        if name and not any(name.startswith(c + ".") for c in chosen) and select(module, name):
            chosen.append(name)
    if not chosen:
        raise ValueError(
            f"{option}={modules!r} matched no block of {type(model).__name__}; allowed: class names or "
            "qualified-name globs of the blocks to checkpoint (default: classes named *Block or *Bottleneck, "
            "and MONAI ResidualUnit)"
        )
    return chosen


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The block's class ``forward`` under activation checkpointing while training with grad.

    Bound to the block as an instance attribute (a bound method, so a deep copy of the model is bound to the
    copy)."""
    forward = functools.partial(type(self).forward, self)
    if self.training and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def checkpoint_forward(model: nn.Module, modules: ModuleSelection = None) -> list[str]:
    """Make the selected blocks of ``model`` run under activation checkpointing while training; returns their names.

    Each block's ``forward`` is replaced on the instance (names and the state dict are unchanged). Blocks
    already patched are left as they are. In eval mode or without grad a block runs plainly. Batch-norm
    layers inside a block see its forward twice per training step, so their running statistics move
    twice per step, as with any checkpointing.

    Raises:
        ValueError: the selection matched no block.
    """
    names = select_blocks(model, modules)
    for name in names:
        block = model.get_submodule(name)
        if getattr(block, _PATCHED, False):
            continue
        if "forward" in vars(block):
            raise ValueError(f"modules: block {name!r} ({type(block).__name__}) has its forward replaced on the "
                             "instance already; checkpoint_forward patches the class forward only")
        block.forward = types.MethodType(_checkpointed_forward, block)  # type: ignore[method-assign]
        setattr(block, _PATCHED, True)
    return names


class ActivationCheckpointing(Callback):
    """Activation checkpointing over the model's blocks, installed at ``setup("fit")``.

    Args:
        modules: class names or qualified-name globs of the blocks to checkpoint (default: classes named
            ``*Block`` or ``*Bottleneck`` and MONAI ``ResidualUnit``).
        verbose: print how many blocks were wrapped.

    Raises:
        ValueError: at setup, when the selection matches no block of the model.

    Example::

        trainer = Trainer(callbacks=[ActivationCheckpointing()])
    """

    def __init__(self, modules: ModuleSelection = None, verbose: bool = True) -> None:
        module_filter(modules, is_block, option="modules")  # a malformed selection fails here, not at setup
        self.modules = modules
        self.verbose = verbose
        #: the qualified names of the checkpointed blocks (after setup)
        self.blocks: list[str] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.blocks:
            return
        self.blocks = checkpoint_forward(pl_module, self.modules)
        if self.verbose and trainer.is_global_zero:
            kinds = sorted({type(pl_module.get_submodule(n)).__name__ for n in self.blocks})
            print(f"ActivationCheckpointing: {len(self.blocks)} blocks recompute in backward ({', '.join(kinds)})")
