"""``Segmenter``: the segmentation recipe's LightningModule (MONAI networks, Dice + cross-entropy)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_memcomp.checkpoint import ConversionCheckpointMixin
from recipes.checks import check_matches_datamodule
from recipes.optim import check_optim_options, make_optimizer, make_scheduler
from recipes.segmentation.networks import build_segmentation_network

__all__ = ["Segmenter"]


def _split(batch: Any) -> tuple[Tensor, Tensor]:
    """``(image, label)`` from a dict batch (MONAI style) or a pair; MONAI MetaTensors become plain tensors."""
    if isinstance(batch, dict):
        x, y = batch["image"], batch["label"]
    else:
        x, y = batch
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    y = y.as_tensor() if hasattr(y, "as_tensor") else y
    return x.float(), y


class Segmenter(ConversionCheckpointMixin, pl.LightningModule):
    """Semantic segmentation with a MONAI network, Dice + cross-entropy loss and the Dice metric.

    Validation and test run sliding-window inference over whole images/volumes with windows of
    ``roi_size``; the mean Dice over foreground classes is logged as ``val/dice`` and ``test/dice``.

    Args:
        network: ``"unet"``, ``"segresnet"`` or ``"dynunet"`` (see ``build_segmentation_network``).
        spatial_dims: 2 (images) or 3 (volumes); must match the DataModule.
        in_channels: image channels; num_classes: label classes including background.
        channels, strides, num_res_units, network_options: the network's shape.
        roi_size: sliding-window size (default 64 per spatial dimension).
        sw_batch_size, overlap: sliding-window batch and overlap.
        lambda_dice, lambda_ce: weights of the two loss terms (MONAI ``DiceCELoss``).
    """

    def __init__(
        self,
        network: str = "unet",
        spatial_dims: int = 2,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 2,
        network_options: dict[str, Any] | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 1e-5,
        scheduler: str = "none",
        warmup_epochs: int = 0,
        roi_size: Sequence[int] | None = None,
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
    ) -> None:
        super().__init__()
        from monai.losses import DiceCELoss
        from monai.metrics import DiceMetric

        check_optim_options(optimizer, scheduler, lr, warmup_epochs)
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} is not allowed; use 2 or more (background included)")
        if roi_size is not None and len(roi_size) != spatial_dims:
            raise ValueError(
                f"roi_size={list(roi_size)} has {len(roi_size)} entries but spatial_dims={spatial_dims}; "
                f"give one size per spatial dimension"
            )
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap={overlap!r} is not allowed; use a value in [0, 1)")
        self.save_hyperparameters()
        self.network = build_segmentation_network(
            network, spatial_dims, in_channels, num_classes, channels, strides, num_res_units,
            **(network_options or {}),
        )
        self.roi_size = tuple(roi_size) if roi_size is not None else (64,) * spatial_dims
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
        self.val_dice = DiceMetric(include_background=False, reduction="mean")
        self.test_dice = DiceMetric(include_background=False, reduction="mean")

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def setup(self, stage: str) -> None:
        check_matches_datamodule(self, ("spatial_dims", "in_channels", "num_classes"))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = _split(batch)
        loss = self.loss_fn(self(x), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def _infer(self, x: Tensor) -> Tensor:
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(
            x, self.roi_size, self.hparams.sw_batch_size, self.network, overlap=self.hparams.overlap
        )

    def _evaluate(self, batch: Any, metric: Any, prefix: str) -> None:
        from monai.networks.utils import one_hot

        x, y = _split(batch)
        logits = self._infer(x)
        logits = logits.as_tensor() if hasattr(logits, "as_tensor") else logits
        self.log(f"{prefix}/loss", self.loss_fn(logits, y), batch_size=x.shape[0])
        k = self.hparams.num_classes
        pred = one_hot(logits.argmax(1, keepdim=True), k)
        metric(y_pred=pred, y=one_hot(y.long(), k))

    def _log_metric(self, metric: Any, name: str) -> None:
        value = metric.aggregate().item()
        metric.reset()
        if not math.isnan(value):
            self.log(name, value, prog_bar=True, sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_dice, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metric(self.val_dice, "val/dice")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_dice, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metric(self.test_dice, "test/dice")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch.float() if isinstance(batch, Tensor) else _split(batch)[0]
        return self._infer(x).argmax(1)

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
        sched = make_scheduler(opt, hp.scheduler, total, max(int(total) // epochs, 1), lr=hp.lr,
                               milestones=(0.5, 0.75), gamma=0.1, warmup_epochs=hp.warmup_epochs)
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}
