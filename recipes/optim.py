"""Optimizer and learning-rate schedule options shared by the recipe LightningModules."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "cosine", "multistep", "step", "onecycle")


def check_optim_options(optimizer: str, scheduler: str, lr: float, warmup_epochs: int = 0) -> None:
    """Fail early, at construction, on names and values that cannot work."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not allowed; use one of {', '.join(OPTIMIZERS)}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r} is not allowed; use one of {', '.join(SCHEDULERS)}")
    if not lr > 0:
        raise ValueError(f"lr={lr!r} is not allowed; use a positive learning rate")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs={warmup_epochs!r} is not allowed; use 0 or more")
    if warmup_epochs and scheduler == "onecycle":
        raise ValueError("warmup_epochs is not allowed with scheduler='onecycle', which has its own warm-up")


def make_optimizer(
    params: Iterable[nn.Parameter], optimizer: str, lr: float, momentum: float, weight_decay: float, nesterov: bool
) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov and momentum > 0)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_scheduler(
    opt: torch.optim.Optimizer,
    scheduler: str,
    total_steps: int,
    steps_per_epoch: int,
    *,
    lr: float,
    milestones: Sequence[float],
    gamma: float,
    warmup_epochs: int,
) -> dict[str, Any] | None:
    """The Lightning ``lr_scheduler`` dict for ``scheduler``, stepped per optimizer step.

    ``milestones`` are fractions of training (``[0.5, 0.75]``: decay at half and three quarters), so a
    config keeps working when ``--trainer.max_epochs`` changes; ``step`` decays every ``milestones[0]``.
    """
    if scheduler == "none":
        return None
    total_steps = max(int(total_steps), 1)
    warmup = min(int(warmup_epochs * steps_per_epoch), total_steps - 1)
    if scheduler == "onecycle":
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=total_steps
        )
        return {"scheduler": sched, "interval": "step"}
    main_steps = total_steps - warmup
    if scheduler == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(main_steps, 1))
    elif scheduler == "multistep":
        marks = sorted({max(1, int(f * main_steps)) for f in milestones})
        main = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=marks, gamma=gamma)
    else:
        every = max(1, int(milestones[0] * main_steps)) if milestones else max(1, main_steps // 3)
        main = torch.optim.lr_scheduler.StepLR(opt, step_size=every, gamma=gamma)
    if warmup > 0:
        ramp = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=warmup)
        main = torch.optim.lr_scheduler.SequentialLR(opt, [ramp, main], milestones=[warmup])
    return {"scheduler": main, "interval": "step"}


def check_milestones(milestones: Sequence[float], gamma: float) -> None:
    for m in milestones:
        if not 0.0 < m < 1.0:
            raise ValueError(f"milestones={list(milestones)!r} is not allowed; use fractions of training in (0, 1)")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma={gamma!r} is not allowed; use a decay factor in (0, 1]")
