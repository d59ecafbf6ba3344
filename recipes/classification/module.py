"""``ImageClassifier``: the classification recipe's LightningModule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_memcomp.checkpoint import ConversionCheckpointMixin
from recipes.checks import check_matches_datamodule
from recipes.classification.networks import build_network
from recipes.optim import check_milestones, check_optim_options, make_optimizer, make_scheduler

__all__ = ["ImageClassifier"]


class ImageClassifier(ConversionCheckpointMixin, pl.LightningModule):
    """Image classification with cross-entropy, top-1 (and top-5) accuracy, SGD/Adam and LR schedules.

    Checkpoints of band-limited or slice-generated models load with ``load_from_checkpoint`` (the
    conversions are rebuilt by :class:`~lightning_memcomp.checkpoint.ConversionCheckpointMixin`).

    Args:
        network: a name :func:`~recipes.classification.build_network` accepts.
        num_classes: classes of the dataset (must match the DataModule's ``num_classes``).
        in_channels: input channels (must match the DataModule's ``in_channels``).
        network_options: extra keyword options of the network (``{"depth": 40}`` for ``densenet_bc``).
        optimizer: ``"sgd"`` (momentum, Nesterov), ``"adam"`` or ``"adamw"``.
        lr: peak learning rate.
        momentum, nesterov: SGD only.
        weight_decay: L2 penalty (decoupled for ``adamw``).
        scheduler: ``"cosine"``, ``"multistep"``, ``"step"``, ``"onecycle"`` or ``"none"``; stepped per batch.
        milestones: fractions of training at which ``multistep`` decays by ``gamma`` (``step``: the period).
        warmup_epochs: linear warm-up before ``cosine``/``multistep``/``step``.
        label_smoothing: cross-entropy label smoothing.
        compile_network: compile the network with ``torch.compile`` in ``configure_model`` (in place, so
            checkpoint keys do not change); ``ActivationCompression`` then compresses inside the compiled graphs.
    """

    def __init__(
        self,
        network: str = "resnet20_cifar",
        num_classes: int = 10,
        in_channels: int = 3,
        network_options: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        scheduler: str = "cosine",
        milestones: Sequence[float] = (0.5, 0.75),
        gamma: float = 0.1,
        warmup_epochs: int = 0,
        label_smoothing: float = 0.0,
        compile_network: bool = False,
    ) -> None:
        super().__init__()
        check_optim_options(optimizer, scheduler, lr, warmup_epochs)
        check_milestones(milestones, gamma)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing!r} is not allowed; use a value in [0, 1)")
        self.save_hyperparameters()
        self.network = build_network(network, num_classes, in_channels, **(network_options or {}))
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # top-5 only where it means something (more than 5 classes)
        self.top5 = num_classes > 5
        if self.top5:
            self.val_acc5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")
            self.test_acc5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def setup(self, stage: str) -> None:
        check_matches_datamodule(self, ("num_classes", "in_channels"))

    def configure_model(self) -> None:
        # after the converters' setup (band limiting, CSG), so the converted network is what compiles
        if self.hparams.get("compile_network") and getattr(self.network, "_compiled_call_impl", None) is None:
            self.network.compile()

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", self._loss(logits, y), prog_bar=False)
        self.val_acc(logits, y)
        self.log("val/acc", self.val_acc, prog_bar=True)
        if self.top5:
            self.val_acc5(logits, y)
            self.log("val/acc_top5", self.val_acc5)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("test/loss", self._loss(logits, y))
        self.test_acc(logits, y)
        self.log("test/acc", self.test_acc)
        if self.top5:
            self.test_acc5(logits, y)
            self.log("test/acc_top5", self.test_acc5)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = make_optimizer(self.parameters(), hp.optimizer, hp.lr, hp.momentum, hp.weight_decay, hp.nesterov)
        total = self.trainer.estimated_stepping_batches
        if hp.scheduler != "none" and math.isinf(total):
            raise ValueError(
                f"scheduler={hp.scheduler!r} needs a finite training length; set --trainer.max_epochs or "
                "--trainer.max_steps, or use --model.init_args.scheduler=none"
            )
        epochs = max(self.trainer.max_epochs or 1, 1)
        sched = make_scheduler(
            opt, hp.scheduler, total, max(int(total) // epochs, 1), lr=hp.lr,
            milestones=hp.milestones, gamma=hp.gamma, warmup_epochs=hp.warmup_epochs,
        )
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}
