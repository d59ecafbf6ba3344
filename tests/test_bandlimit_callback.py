"""``BandLimiting``: converts at setup, logs, and survives checkpoint save, load and resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_memcomp
from lightning_memcomp.bandlimit import BandLimitedConv2d, BandLimiting
from lightning_memcomp.checkpoint import CHECKPOINT_KEY, ConversionCheckpointMixin, conversions_of


class TinyDigits(ConversionCheckpointMixin, pl.LightningModule):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.conv = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(width, width, 1)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        return self.head(torch.relu(self.mix(x)).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.fixture
def loader(digits):
    x, y = digits["train"]
    return DataLoader(TensorDataset(x[:64, :, :16, :16], y[:64]), batch_size=32)


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )


def test_callback_is_exported_from_the_package():
    assert lightning_memcomp.BandLimiting is BandLimiting


def test_invalid_options_fail_at_construction():
    with pytest.raises(ValueError, match="compress_rate=-3"):
        BandLimiting(compress_rate=-3)
    with pytest.raises(ValueError, match="both given"):
        BandLimiting(compress_rate=10, preserve_energy=50)


def test_setup_converts_before_the_optimizer_is_built(tmp_path, loader):
    seen = {}

    class Spy(TinyDigits):
        def configure_optimizers(self):
            seen["types"] = (type(self.stem), type(self.conv), type(self.mix))
            return super().configure_optimizers()

    model = Spy()
    callback = BandLimiting(compress_rate=50)
    _trainer(tmp_path, [callback], max_steps=1).fit(model, loader)
    assert seen["types"] == (BandLimitedConv2d, BandLimitedConv2d, nn.Conv2d)
    assert {c.name for c in callback.report.converted} == {"stem", "conv"}


def test_setup_converts_once_across_stages(tmp_path, loader):
    model = TinyDigits()
    callback = BandLimiting(compress_rate=50)
    trainer = _trainer(tmp_path, [callback], max_steps=1)
    trainer.fit(model, loader)
    stem = model.stem
    trainer.validate(model, loader, verbose=False)
    assert model.stem is stem
    assert len(conversions_of(model)) == 1


def test_realized_compression_is_logged_each_training_step(tmp_path, loader):
    model = TinyDigits()
    trainer = _trainer(tmp_path, [BandLimiting(preserve_energy=90)], max_steps=2)
    trainer.fit(model, loader)
    logged = trainer.callback_metrics["band_limit/realized_compression"]
    assert 0.0 < float(logged) < 1.0


def test_checkpoint_load_and_resume_rebuild_the_band_limited_layers(tmp_path, loader):
    model = TinyDigits()
    trainer = _trainer(tmp_path, [BandLimiting(compress_rate=75)], max_steps=2)
    trainer.fit(model, loader)
    path = tmp_path / "band.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)[CHECKPOINT_KEY][0]["options"]["compress_rate"] == 75

    # load_from_checkpoint without the callback: the mixin rebuilds the layers before the weights load
    loaded = TinyDigits.load_from_checkpoint(path)
    assert isinstance(loaded.stem, BandLimitedConv2d) and loaded.stem.compress_rate == 75
    assert isinstance(loaded.mix, nn.Conv2d) and not isinstance(loaded.mix, BandLimitedConv2d)
    x = torch.randn(3, 1, 16, 16)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), model(x))

    # resume training from the checkpoint
    resumed = TinyDigits()
    trainer2 = _trainer(tmp_path, [BandLimiting(compress_rate=75)], max_steps=4)
    trainer2.fit(resumed, loader, ckpt_path=path)
    assert trainer2.global_step == 4
    assert isinstance(resumed.conv, BandLimitedConv2d)


def test_resuming_with_different_options_warns(tmp_path, loader):
    model = TinyDigits()
    trainer = _trainer(tmp_path, [BandLimiting(compress_rate=75)], max_steps=1)
    trainer.fit(model, loader)
    path = tmp_path / "band.ckpt"
    trainer.save_checkpoint(path)
    with pytest.warns(UserWarning, match="checkpoint was band-limited"):
        _trainer(tmp_path, [BandLimiting(compress_rate=25)], max_steps=2).fit(TinyDigits(), loader, ckpt_path=path)


def test_setup_estimates_on_example_input_array_and_warns_before_converting(tmp_path, loader):
    from lightning_memcomp.bandlimit import BandLimitMemoryError

    class WithExample(TinyDigits):
        def __init__(self) -> None:
            super().__init__()
            self.example_input_array = torch.randn(2, 1, 16, 16)

    callback = BandLimiting(compress_rate=50, fft_size="power2")
    message = r"(?s)estimate: 2 convolution call\(s\) would hold .* MiB.*stem at input 2x1x16x16"
    with pytest.warns(UserWarning, match=message):
        _trainer(tmp_path, [callback], max_steps=1).fit(WithExample(), loader)
    assert callback.report.extra["estimate"].holds_more
    refused = WithExample()
    with pytest.raises(BandLimitMemoryError, match="Nothing was converted"):
        _trainer(tmp_path, [BandLimiting(fft_size="power2", on_larger="error")], max_steps=1).fit(refused, loader)
    assert type(refused.stem) is nn.Conv2d


def test_an_example_input_that_does_not_run_falls_back_to_checks_at_the_first_forward(tmp_path, loader):
    class WrongExample(TinyDigits):
        def __init__(self) -> None:
            super().__init__()
            self.example_input_array = torch.randn(2, 3, 16, 16)  # 3 channels: the stem takes 1

    model = WrongExample()
    with pytest.warns(UserWarning, match="could not estimate on example_input_array"):
        _trainer(tmp_path, [BandLimiting()], max_steps=1).fit(model, loader)
    assert isinstance(model.stem, BandLimitedConv2d) and model.stem._checked_sizes == {(16, 16)}
