"""The alternative: activation checkpointing (``torch.utils.checkpoint``) over a network's blocks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["Checkpointed", "checkpoint_blocks"]


class Checkpointed(nn.Module):
    """Runs the wrapped block under ``torch.utils.checkpoint`` (non-reentrant) while training with grad.

    Only the block's inputs are kept for backward; its inside is recomputed when backward reaches it.
    In eval mode or without grad it is the plain block. (Batch-norm layers inside see their forward twice
    in a training step, so their running statistics move twice per step, as with any checkpointing.)
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.block, *args, use_reentrant=False, **kwargs)
        return self.block(*args, **kwargs)


def checkpoint_blocks(model: nn.Module, modules: Sequence[str] | None = None) -> list[str]:
    """Wrap, in place, the outermost selected blocks of ``model`` in :class:`Checkpointed`; returns their names.

    Args:
        modules: class names or qualified-name globs (see :mod:`lightning_memcomp.surgery`); default:
            every module whose class name ends in ``Block`` or ``Bottleneck`` (ResNet, DenseNet) and MONAI's
            ``ResidualUnit`` (each UNet level's convolutions).

    Raises:
        ValueError: the selection matched no module.
    """
    from lightning_memcomp.recompute import is_block
    from lightning_memcomp.surgery import module_filter

    select = module_filter(list(modules) if modules else None, is_block, option="--checkpoint-modules")
    wrapped: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, Checkpointed) or any(name.startswith(w + ".") for w in wrapped):
            continue
        if select(module, name):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, Checkpointed(module))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(
            f"--checkpoint-modules={list(modules) if modules else None!r} matched no block of "
            f"{type(model).__name__}; give class names or qualified-name globs of the blocks to checkpoint"
        )
    return wrapped
