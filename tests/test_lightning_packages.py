"""The callbacks, MemoryMonitor and both strategies under ``lightning`` and under ``pytorch_lightning``.

Every test runs once per package, with a LightningModule, Trainer and logger from that package.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_memcomp import ActivationCompression, BandLimiting, ConvSliceGeneration, MemoryMonitor
from lightning_memcomp.csg import SliceConv
from lightning_memcomp.strategies import register_strategies, strategies_for

PACKAGES = ["lightning.pytorch", "pytorch_lightning"]


@pytest.fixture(params=PACKAGES)
def package(request) -> ModuleType:
    return importlib.import_module(request.param)


def _model(package: ModuleType) -> nn.Module:
    class TinyNet(package.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                     nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return TinyNet()


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g))
    return DataLoader(data, batch_size=8)


def _fit(package: ModuleType, tmp_path: Path, model: nn.Module | None = None, **kwargs):
    kwargs.setdefault("logger", False)
    trainer = package.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, max_steps=2,
                              enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                              **kwargs)
    model = model if model is not None else _model(package)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model, _loader())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "the fit did not train"
    return trainer, model


def test_callback_base_is_a_callback_of_both_packages():
    import lightning.pytorch
    import pytorch_lightning

    for callback in (ActivationCompression(), BandLimiting(compress_rate=50), MemoryMonitor()):
        assert isinstance(callback, lightning.pytorch.Callback)
        assert isinstance(callback, pytorch_lightning.Callback)


def test_activation_compression(package, tmp_path):
    callback = ActivationCompression(bits=4, min_bytes=0)
    _fit(package, tmp_path, callbacks=[callback])
    ledger = callback.memcomp_ledger
    assert ledger is not None and ledger.raw_bytes > 0 and ledger.stored_bytes < ledger.raw_bytes / 2


def test_band_limiting(package, tmp_path):
    callback = BandLimiting(compress_rate=50)
    _fit(package, tmp_path, callbacks=[callback])
    assert callback.report is not None and {c.name for c in callback.report.converted} == {"net.0", "net.2"}


def test_conv_slice_generation(package, tmp_path):
    callback = ConvSliceGeneration(slice_shape=(4, 4, 3, 3), code_size=8, verbose=False)
    _, model = _fit(package, tmp_path, callbacks=[callback])
    # net.0 has one input channel, fewer than a slice's 4: it stays a plain convolution
    assert [name for name, m in model.named_modules() if isinstance(m, SliceConv)] == ["net.2"]


def test_conv_slice_generation_refuses_the_packages_fsdp(package):
    from lightning_memcomp.csg.callback import _reject_sharded

    fsdp = importlib.import_module(f"{package.__name__}.strategies").FSDPStrategy()
    with pytest.raises(RuntimeError, match="ConvSliceGeneration does not support strategy=FSDPStrategy"):
        _reject_sharded(SimpleNamespace(strategy=fsdp))


def test_memory_monitor_writes_its_tensorboard_extras(package, tmp_path):
    logger = importlib.import_module(f"{package.__name__}.loggers").TensorBoardLogger(tmp_path, name="tb")
    monitor = MemoryMonitor(every_n_steps=1)
    trainer, _ = _fit(package, tmp_path, callbacks=[ActivationCompression(min_bytes=0), monitor], logger=logger,
                      log_every_n_steps=1)
    events = EventAccumulator(trainer.log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert "memory/held_stored_mib" in tags["scalars"]
    assert "custom_scalars__config__" in tags["tensors"]
    assert "memory/held_by_module/text_summary" in tags["tensors"]
    assert "memory/curves" in tags["images"]
    assert (Path(trainer.log_dir) / "memory_log.csv").is_file()


@pytest.mark.parametrize("name", ["memcomp", "ddp_memcomp"])
def test_strategy_names(package, tmp_path, name):
    strategies = importlib.import_module(f"{package.__name__}.strategies")
    trainer, _ = _fit(package, tmp_path, strategy=name)
    strategy = trainer.strategy
    expected = strategies.SingleDeviceStrategy if name == "memcomp" else strategies.DDPStrategy
    assert isinstance(strategy, expected) and type(strategy) in strategies_for(package.__name__)
    ledger = strategy.memcomp_ledger
    assert ledger is not None and 0 < ledger.stored_bytes < ledger.raw_bytes


def test_pytorch_lightning_classes_have_a_public_path():
    import pytorch_lightning

    from lightning_memcomp.strategies import pytorch_lightning as for_pl

    assert for_pl.DDPMemCompStrategy.__module__ == "lightning_memcomp.strategies.pytorch_lightning"
    assert issubclass(for_pl.DDPMemCompStrategy, pytorch_lightning.strategies.DDPStrategy)
    assert issubclass(for_pl.MemCompSingleDeviceStrategy, pytorch_lightning.strategies.SingleDeviceStrategy)
    assert pytorch_lightning.strategies.StrategyRegistry["ddp_memcomp"]["strategy"] is for_pl.DDPMemCompStrategy


def test_a_strategy_of_the_other_package_is_refused_by_lightning(tmp_path):
    import pytorch_lightning

    from lightning_memcomp.strategies import MemCompSingleDeviceStrategy

    with pytest.raises(ValueError, match="invalid strategy"):
        pytorch_lightning.Trainer(default_root_dir=tmp_path, strategy=MemCompSingleDeviceStrategy(), logger=False)


def test_register_strategies_names_the_allowed_registries():
    with pytest.raises(ValueError, match="registry=.*StrategyRegistry of an installed Lightning package"):
        register_strategies(object())
    with pytest.raises(ValueError, match="package='lightning.fabric' is not a Lightning package"):
        strategies_for("lightning.fabric")


CLI_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import pytorch_lightning as pl
    from pytorch_lightning.cli import LightningCLI

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(64, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(8, 64)), batch_size=4)

    assert not any(name.startswith("lightning_memcomp") for name in sys.modules)
    cli = LightningCLI(Model, run=False, trainer_defaults=dict(logger=False, enable_progress_bar=False, max_steps=1))
    cli.trainer.fit(cli.model)
    strategy = cli.trainer.strategy
    print("strategy:", type(strategy).__module__, type(strategy).__name__, strategy.memcomp_options)
    """
)


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "train.py"
    script.write_text(CLI_SCRIPT)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)


def test_a_fresh_lightning_cli_takes_the_strategy_class_path(tmp_path):
    path = "lightning_memcomp.strategies.pytorch_lightning.MemCompSingleDeviceStrategy"
    done = _cli(tmp_path, f"--trainer.strategy={path}", "--trainer.strategy.init_args.bits=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"strategy: {path.replace('.Mem', ' Mem')} {{'bits': 2}}" in done.stdout


def test_a_fresh_lightning_cli_does_not_know_the_strategy_name(tmp_path):
    # Lightning resolves strategy= before it loads any plugin entry point (README, "Lightning packages"): the
    # name needs our import. If this starts to pass, Lightning gained a way and the README should say so.
    done = _cli(tmp_path, "--trainer.strategy=memcomp")
    assert done.returncode != 0 and "invalid strategy name: `strategy='memcomp'`" in done.stderr
