"""``Trainer.fit`` with each transform-domain codec: it trains, compresses, checkpoints and resumes."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_memcomp.compression.callback import ActivationCompression

STEPS_PER_EPOCH = 4


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class DigitsModule(pl.LightningModule):
    """A tiny classifier over the SmallCNN that records its losses and the weights it started from."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.losses: list[float] = []
        self.start_weights: dict[str, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def on_train_start(self) -> None:
        self.start_weights = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def _trainer(max_epochs: int, callback: ActivationCompression, root: Path) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], default_root_dir=root,
    )


@pytest.mark.parametrize(
    ("codec", "options"),
    [("threshold", {}), ("dct", {"block": 8}), ("wavelet", {"wavelet": "haar", "levels": 2})],
)
def test_fit_with_codec_trains_compresses_and_resumes_from_a_checkpoint(
    codec: str, options: dict, small_cnn, digits, tmp_path: Path
) -> None:
    x, y = digits["train"]
    loader = DataLoader(TensorDataset(x[: 32 * STEPS_PER_EPOCH], y[: 32 * STEPS_PER_EPOCH]), batch_size=32)
    torch.manual_seed(0)
    module = DigitsModule(small_cnn())
    # the transform everywhere (no fallback to quant where it is inaccurate): this test is about the transform
    callback = ActivationCompression(codec=codec, compression_ratio=10, policy={"transform_max_error": None},
                                     **options)
    trainer = _trainer(1, callback, tmp_path)
    trainer.fit(module, loader)

    ledger = callback.memcomp_ledger
    assert ledger is not None
    compressed = ledger.by_codec()[codec]
    assert compressed.stored_bytes <= 0.2 * compressed.raw_bytes
    assert all(torch.isfinite(p).all() for p in module.parameters())

    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]

    resumed = DigitsModule(small_cnn())
    callback2 = ActivationCompression(codec=codec, compression_ratio=10, policy={"transform_max_error": None},
                                      **options)
    trainer2 = _trainer(3, callback2, tmp_path)
    trainer2.fit(resumed, loader, ckpt_path=ckpt)

    assert trainer2.global_step == 3 * STEPS_PER_EPOCH
    assert all(torch.equal(resumed.start_weights[k], saved[k]) for k in saved)
    losses = module.losses + resumed.losses
    assert sum(losses[-3:]) / 3 < losses[0]
