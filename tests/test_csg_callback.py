"""ConvSliceGeneration callback: conversion at setup, logging, checkpoints, resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_memcomp import ConvSliceGeneration
from lightning_memcomp.checkpoint import CHECKPOINT_KEY, ConversionCheckpointMixin, conversions_of
from lightning_memcomp.csg import GENERATOR_NAME, SliceConv

REPO = Path(__file__).resolve().parents[1]


class LitCNN(ConversionCheckpointMixin, pl.LightningModule):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CapturingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g))
    return DataLoader(data, batch_size=8)


def _trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, log_every_n_steps=1,
    )  # fmt: skip
    options.update(kwargs)
    return pl.Trainer(**options)


def _callback(**kwargs: Any) -> ConvSliceGeneration:
    return ConvSliceGeneration(slice_shape=(4, 4, 3, 3), code_size=8, verbose=False, **kwargs)


def test_callback_converts_before_the_optimizers_are_built(tmp_path) -> None:
    model = LitCNN()
    trainer = _trainer(tmp_path, callbacks=[_callback()], enable_checkpointing=False)
    trainer.fit(model, _loader())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(getattr(model, GENERATOR_NAME).weight) in optimized
    assert id(model.net[2].codes) in optimized and id(model.net[4].codes) in optimized
    assert type(model.net[0]) is nn.Conv2d  # the first convolution stays ordinary


def test_callback_logs_parameter_counts_and_ratio(tmp_path) -> None:
    logger = CapturingLogger()
    model = LitCNN()
    before = sum(p.numel() for p in model.parameters())
    callback = _callback()
    _trainer(tmp_path, callbacks=[callback], logger=logger, enable_checkpointing=False).fit(model, _loader())
    after = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert logger.metrics["csg/params_before"] == before
    assert logger.metrics["csg/params_after"] == after
    assert logger.metrics["csg/param_ratio"] == pytest.approx(before / after)
    assert callback.report is not None and len(callback.report.converted) == 2


def test_setup_is_idempotent_across_stages(tmp_path) -> None:
    model = LitCNN()
    trainer = _trainer(tmp_path, callbacks=[_callback()], enable_checkpointing=False)
    trainer.fit(model, _loader())
    generator = getattr(model, GENERATOR_NAME)
    trainer.validate(model, _loader(), verbose=False)
    assert getattr(model, GENERATOR_NAME) is generator
    assert len(conversions_of(model)) == 1
    assert sum(isinstance(m, SliceConv) for m in model.modules()) == 2


def test_checkpoint_records_the_conversion_and_load_from_checkpoint_rebuilds_it(tmp_path) -> None:
    model = LitCNN()
    trainer = _trainer(tmp_path, callbacks=[_callback()])
    trainer.fit(model, _loader())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint[CHECKPOINT_KEY][0]["technique"] == "slice_generate"
    loaded = LitCNN.load_from_checkpoint(path)
    assert isinstance(loaded.net[2], SliceConv) and loaded.net[2].generator is getattr(loaded, GENERATOR_NAME)
    x = torch.randn(4, 1, 8, 8)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), model(x))


def test_resume_with_ckpt_path_restores_the_codes_and_continues(tmp_path) -> None:
    model = LitCNN()
    first = _trainer(tmp_path, callbacks=[_callback()], max_steps=4)  # one epoch
    first.fit(model, _loader())
    path = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]

    class Check(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.restored = {k: v.clone() for k, v in pl_module.state_dict().items() if torch.is_tensor(v)}

    check = Check()
    resumed = LitCNN()
    second = _trainer(tmp_path, callbacks=[_callback(), check], max_steps=8)
    second.fit(resumed, _loader(), ckpt_path=path)
    assert second.global_step == 8
    for key in (f"{GENERATOR_NAME}.weight", "net.2.codes", "net.4.codes"):
        torch.testing.assert_close(check.restored[key], saved[key])
    assert not torch.equal(resumed.net[2].codes.detach(), saved["net.2.codes"])  # it trained on


def test_binary_generator_stays_fixed_through_training(tmp_path) -> None:
    initial: dict[str, torch.Tensor] = {}

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            initial["gen"] = getattr(pl_module, GENERATOR_NAME).weight.detach().clone()
            initial["codes"] = pl_module.net[2].codes.detach().clone()

    model = LitCNN()
    callbacks = [_callback(binary=True), Snapshot()]
    _trainer(tmp_path, callbacks=callbacks, enable_checkpointing=False).fit(model, _loader())
    torch.testing.assert_close(getattr(model, GENERATOR_NAME).weight, initial["gen"], rtol=0, atol=0)
    assert not torch.equal(model.net[2].codes.detach(), initial["codes"])


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"slice_shape": (4, 4, 3, 0)}, "slice_shape"),
        ({"code_size": -1}, "code_size"),
        ({"init": "orthogonal"}, "init"),
        ({"binary": True, "init": "fit"}, "binary generator"),
    ],
)
def test_callback_rejects_invalid_options_at_construction(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        ConvSliceGeneration(**options)


def test_callback_rejects_sharded_strategies() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy(), loggers=[], global_step=0)
    with pytest.raises(RuntimeError, match="FSDPStrategy"):
        _callback().setup(trainer, LitCNN(), "fit")


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {test_dir!r})
    from test_csg_callback import LitCNN, _loader
    from lightning_memcomp import ConvSliceGeneration
    from lightning_memcomp.csg import GENERATOR_NAME

    def trainer(max_steps):
        return pl.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps, logger=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir={root!r},
            callbacks=[ConvSliceGeneration(slice_shape=(4, 4, 3, 3), code_size=8, verbose=False)],
        )

    if __name__ == "__main__":
        pl.seed_everything(0)
        model = LitCNN()
        first = trainer(4)
        first.fit(model, _loader())
        first.save_checkpoint({ckpt!r})
        gen_after_first = getattr(model, GENERATOR_NAME).weight.detach().clone()
        resumed = LitCNN()
        second = trainer(8)
        second.fit(resumed, _loader(), ckpt_path={ckpt!r})
        gen = getattr(resumed, GENERATOR_NAME).weight.detach()
        gathered = [torch.empty_like(gen) for _ in range(2)]
        dist.all_gather(gathered, gen)
        if second.global_rank == 0:
            json.dump({{
                "world_size": second.world_size,
                "global_step": second.global_step,
                "ranks_agree": bool(torch.equal(gathered[0], gathered[1])),
                "generator_trained": not torch.equal(gen, gen_after_first),
                "generator_once": sum(p is getattr(resumed, GENERATOR_NAME).weight for p in resumed.parameters()),
            }}, open({result!r}, "w"))
    """
)


@pytest.mark.slow
def test_two_process_ddp_fit_trains_checkpoints_and_resumes(tmp_path) -> None:
    script = tmp_path / "ddp_csg.py"
    result = tmp_path / "result.json"
    script.write_text(
        DDP_SCRIPT.format(
            test_dir=str(Path(__file__).parent), root=str(tmp_path), ckpt=str(tmp_path / "ddp.ckpt"),
            result=str(result),
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    outcome = json.loads(result.read_text())
    assert outcome == {
        "world_size": 2, "global_step": 8, "ranks_agree": True, "generator_trained": True, "generator_once": 1,
    }  # fmt: skip
