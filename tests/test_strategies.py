"""The ``memcomp`` / ``ddp_memcomp`` strategies, and fit + checkpoint + resume with compression."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import run_ddp_script
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_memcomp.strategies  # noqa: F401  (registers the strategies)
from lightning_memcomp.strategies import DDPMemCompStrategy, MemCompSingleDeviceStrategy

ROOT = Path(__file__).resolve().parent.parent


class TinyNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                 nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))
        self.active_in_validation: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        engine = getattr(self.trainer.strategy, "_memcomp_engine", None)
        self.active_in_validation.append(bool(engine is not None and engine.active))
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=16)


def _trainer(tmp_path: Path, strategy, **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 1)
    return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, strategy=strategy,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=1, **kwargs)


def test_strategies_registered_on_import():
    assert "memcomp" in StrategyRegistry and "ddp_memcomp" in StrategyRegistry
    assert isinstance(StrategyRegistry.get("memcomp"), MemCompSingleDeviceStrategy)
    ddp = StrategyRegistry.get("ddp_memcomp")
    assert isinstance(ddp, DDPMemCompStrategy) and ddp._start_method == "popen"


def test_bad_codec_option_fails_at_construction():
    with pytest.raises(ValueError, match="bits=3"):
        MemCompSingleDeviceStrategy(bits=3)
    with pytest.raises(ValueError, match="codec='jpeg'"):
        DDPMemCompStrategy(codec="jpeg")


def test_memcomp_strategy_compresses_training_steps_only(tmp_path):
    model = TinyNet()
    strategy = MemCompSingleDeviceStrategy(bits=2, min_bytes=0)
    trainer = _trainer(tmp_path, strategy, max_steps=2)
    trainer.fit(model, _loader(), _loader(16))
    ledger = strategy.memcomp_ledger
    assert ledger is not None and ledger.count > 0
    assert ledger.stored_bytes < ledger.raw_bytes / 4
    assert model.active_in_validation and not any(model.active_in_validation)
    assert not strategy._memcomp_engine.active


def test_engine_closed_when_training_step_raises(tmp_path):
    class Failing(TinyNet):
        def training_step(self, batch, batch_idx):
            self(batch[0])
            raise RuntimeError("boom")

    strategy = MemCompSingleDeviceStrategy(bits=4)
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, strategy).fit(Failing(), _loader())
    assert strategy._memcomp_engine is not None and not strategy._memcomp_engine.active
    # hooks are gone: a plain forward+backward outside the strategy stores nothing through the engine
    strategy._memcomp_engine.ledger.reset()
    model = strategy._memcomp_engine.model
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    assert strategy._memcomp_engine.ledger.count == 0


def test_strategy_fit_checkpoint_resume(tmp_path):
    trainer = _trainer(tmp_path, MemCompSingleDeviceStrategy(bits=4), max_epochs=1)
    trainer.fit(TinyNet(), _loader())
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    steps = trainer.global_step
    resumed = _trainer(tmp_path, "memcomp", max_epochs=2)
    resumed.fit(TinyNet(), _loader(), ckpt_path=ckpt)
    assert resumed.global_step == 2 * steps
    assert resumed.strategy.memcomp_ledger.ratio > 1


def test_callback_fit_checkpoint_resume(tmp_path):
    from lightning_memcomp.compression.callback import ActivationCompression

    callback = ActivationCompression(bits=4, min_bytes=0)
    trainer = _trainer(tmp_path, "auto", max_epochs=1, callbacks=[callback])
    model = TinyNet()
    trainer.fit(model, _loader(), _loader(16))
    assert callback.memcomp_ledger.ratio > 4
    ckpt = tmp_path / "cb.ckpt"
    trainer.save_checkpoint(ckpt)
    steps = trainer.global_step
    resumed_cb = ActivationCompression(bits=4, min_bytes=0)
    resumed = _trainer(tmp_path, "auto", max_epochs=2, callbacks=[resumed_cb])
    resumed.fit(TinyNet(), _loader(), _loader(16), ckpt_path=ckpt)
    assert resumed.global_step == 2 * steps
    assert resumed_cb.memcomp_ledger.ratio > 4


def test_lightning_cli_yaml_configures_the_strategy(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent("""
        trainer:
          accelerator: cpu
          logger: false
          strategy:
            class_path: lightning_memcomp.strategies.MemCompSingleDeviceStrategy
            init_args:
              codec: quant
              bits: 2
              codec_options: {group_size: 512}
    """))
    cli = LightningCLI(TinyNet, run=False, args=["--config", str(config)], save_config_callback=None)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, MemCompSingleDeviceStrategy)
    assert strategy.memcomp_options == {"group_size": 512, "bits": 2}


DDP_SCRIPT = """
import os
import sys
import torch
import lightning.pytorch as pl
sys.path.insert(0, {tests!r})
import lightning_memcomp.strategies  # registers ddp_memcomp
from test_strategies import TinyNet, _loader

def trainer(root, epochs):
    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=2, strategy="ddp_memcomp",
                      max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=1)

root = sys.argv[1]
first = trainer(root, 1)
first.fit(TinyNet(), _loader(), _loader(16))
first.save_checkpoint(root + "/ddp.ckpt")
steps = first.global_step
# the first fit's store may still hold its port while the second binds (seen on a loaded machine): both ranks move
# to the next port, the same on each
os.environ["MASTER_PORT"] = str(int(os.environ["MASTER_PORT"]) + 1)
second = trainer(root, 2)
second.fit(TinyNet(), _loader(), _loader(16), ckpt_path=root + "/ddp.ckpt")
ledger = second.strategy.memcomp_ledger
assert second.global_step == 2 * steps, (second.global_step, steps)
assert ledger is not None and ledger.ratio > 1, ledger
print(f"rank {{second.global_rank}}: steps {{steps}} -> {{second.global_step}}, {{ledger}}", flush=True)
"""


@pytest.mark.slow
def test_ddp_memcomp_two_cpu_processes_fit_checkpoint_resume(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests")))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = run_ddp_script([str(script), str(tmp_path)], cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "rank 0: steps 2 -> 4" in done.stdout


def test_callback_under_bf16_mixed_precision_compresses_and_trains(tmp_path):
    from lightning_memcomp.compression.callback import ActivationCompression

    callback = ActivationCompression(bits=4, min_bytes=0)
    trainer = _trainer(tmp_path, "auto", max_steps=3, callbacks=[callback], precision="bf16-mixed")
    model = TinyNet()
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model, _loader())
    ledger = callback.memcomp_ledger
    assert ledger.parameter_saves > 0  # autocast weight copies were recognised, not quantized
    assert ledger.ratio > 2  # bf16 activations stored in 4 bits (plus exact routing)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
