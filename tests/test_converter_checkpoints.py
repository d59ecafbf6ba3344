"""Converted checkpoints across loaders: the record in the state dict, ``load_converted``, plain
``load_from_checkpoint`` and ``Trainer(ckpt_path=...)`` with another technique, and ``weights_only`` reading."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_memcomp
from lightning_memcomp import BandLimiting, ConvSliceGeneration, band_limit, load_converted, slice_generate
from lightning_memcomp.bandlimit import BandLimitedConv2d
from lightning_memcomp.checkpoint import (
    CHECKPOINT_KEY,
    RECORD_KEY,
    ConversionCheckpointMixin,
    ConversionMismatchError,
    conversions_in,
    conversions_of,
)
from lightning_memcomp.csg import SliceConv, fold_slices

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _net(width: int = 16) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )  # fmt: skip


class Plain(pl.LightningModule):
    """A user's module: no mixin."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = _net(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class WithMixin(ConversionCheckpointMixin, Plain):
    pass


@pytest.fixture
def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 1, 12, 12, generator=g), torch.randint(0, 10, (16,), generator=g)),
                      batch_size=8)


def _trainer(tmp_path, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, callbacks=list(callbacks), logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _fit(tmp_path, module, callbacks, loader, name: str) -> Path:
    trainer = _trainer(tmp_path, callbacks, max_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    path = tmp_path / name
    trainer.save_checkpoint(path)
    return path


def test_load_converted_is_exported():
    assert lightning_memcomp.load_converted is load_converted


def test_the_state_dict_records_the_conversion_without_changing_the_module_tree():
    model = _net()
    band_limit(model, compress_rate=60)
    assert len(model) == 9 and all(not isinstance(m, type(None)) for m in model)  # a Sequential stays the same
    state = model.state_dict()
    assert conversions_in(state) == conversions_of(model)
    assert state[RECORD_KEY]["conversions"][0]["options"]["compress_rate"] == 60
    model(torch.randn(2, 1, 8, 8))  # still runs as a sequence


@pytest.mark.parametrize("technique", ["band_limit", "slice_generate"])
def test_plain_load_from_checkpoint_of_a_converted_run_fails_instead_of_returning_plain_layers(
    tmp_path, loader, technique
):
    callback = BandLimiting(compress_rate=50) if technique == "band_limit" else ConvSliceGeneration(code_size=16)
    path = _fit(tmp_path, Plain(), [callback], loader, "run.ckpt")
    with pytest.raises(RuntimeError, match=re.escape('Unexpected key(s) in state_dict: ') + f'.*"{RECORD_KEY}"'):
        Plain.load_from_checkpoint(path)


@pytest.mark.parametrize("technique", ["band_limit", "slice_generate"])
def test_load_converted_rebuilds_the_conversion_from_the_class_or_an_instance(tmp_path, loader, technique):
    trained = Plain()
    callback = BandLimiting(compress_rate=70) if technique == "band_limit" else ConvSliceGeneration(code_size=16)
    path = _fit(tmp_path, trained, [callback], loader, "run.ckpt")
    kind = BandLimitedConv2d if technique == "band_limit" else SliceConv
    x = torch.randn(3, 1, 12, 12)
    trained.eval()
    for loaded in (load_converted(Plain, path), load_converted(Plain(), path)):
        assert isinstance(loaded.net[2], kind) and isinstance(loaded.net[4], kind)
        loaded.eval()
        torch.testing.assert_close(loaded(x), trained(x))
    assert conversions_of(load_converted(Plain, path)) == conversions_of(trained)


def test_load_converted_reads_a_plain_state_dict_file(tmp_path):
    model = Plain()
    slice_generate(model, code_size=16)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    loaded = load_converted(Plain(), path)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))


class Payload:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_load_converted_reads_with_weights_only(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _net().state_dict(), "extra": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_converted(_net(), path)


def test_nothing_in_the_package_recipes_or_benchmarks_loads_a_checkpoint_without_weights_only():
    offenders = []
    for folder in ("lightning_memcomp", "recipes", "benchmarks"):
        for file in (REPO / folder).rglob("*.py"):
            for call in re.findall(r"torch\.load\((?:[^()]|\([^()]*\))*\)", file.read_text()):
                if "weights_only=True" not in call:
                    offenders.append(f"{file.relative_to(REPO)}: {call}")
    assert offenders == []


def test_a_state_dict_converted_otherwise_fails_with_both_named():
    banded, csg = _net(), _net()
    band_limit(banded, compress_rate=50)
    slice_generate(csg, code_size=16)
    with pytest.raises(ConversionMismatchError, match=r"converted by band_limit\(compress_rate=50\.0.*this model by "
                                                      r"slice_generate\(.*load_converted"):
        csg.load_state_dict(banded.state_dict())
    with pytest.raises(ConversionMismatchError, match="converted by band_limit"):
        csg.load_state_dict(banded.state_dict(), strict=False)  # lenient loading cannot put weights in codes


def test_other_band_limiting_options_load_with_a_warning_and_keep_the_model_options():
    a, b = _net(), _net()
    band_limit(a, compress_rate=50)
    band_limit(b, compress_rate=80)
    with pytest.warns(UserWarning, match="checkpoint was band-limited with band_limit\\(compress_rate=50.0"):
        b.load_state_dict(a.state_dict())
    assert b[2].compress_rate == 80


def test_plain_weights_load_into_a_band_limited_model_but_not_into_a_slice_generated_one():
    pretrained = _net()
    banded = _net()
    band_limit(banded)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        banded.load_state_dict(pretrained.state_dict())  # the same tensors: fine-tuning from pretrained weights
    assert torch.equal(banded[2].weight, pretrained[2].weight)
    csg = _net()
    slice_generate(csg, code_size=16)
    with pytest.raises(ConversionMismatchError, match=r"no conversion \(plain layers\).*init='fit'"):
        csg.load_state_dict(pretrained.state_dict())


def test_an_exported_model_refuses_a_converted_state_dict_with_the_way_to_load_it():
    model = _net()
    slice_generate(model, code_size=16)
    state = model.state_dict()
    folded = fold_slices(model)
    assert RECORD_KEY not in folded.state_dict()
    _net().load_state_dict(folded.state_dict())  # the export is the plain architecture's state dict
    with pytest.raises(ConversionMismatchError, match="this model is not.*load_converted"):
        folded.load_state_dict(state)


def test_resuming_a_csg_checkpoint_with_a_baseline_config_fails_naming_both(tmp_path, loader):
    path = _fit(tmp_path, WithMixin(), [ConvSliceGeneration(code_size=16)], loader, "csg.ckpt")
    resumed = WithMixin()
    with pytest.raises(ConversionMismatchError, match=r"slice_generate\(.*no conversion.*ConvSliceGeneration"):
        _trainer(tmp_path, [], max_steps=2).fit(resumed, loader, ckpt_path=path)
    assert not any(isinstance(m, SliceConv) for m in resumed.modules())  # not rebuilt silently


def test_evaluating_a_csg_checkpoint_with_a_baseline_config_warns_and_rebuilds(tmp_path, loader):
    path = _fit(tmp_path, WithMixin(), [ConvSliceGeneration(code_size=16)], loader, "csg.ckpt")
    module = WithMixin()
    with pytest.warns(UserWarning, match=r"slice_generate.*the configuration applies none; rebuilding"):
        _trainer(tmp_path, []).validate(module, loader, ckpt_path=path, verbose=False)
    assert isinstance(module.net[2], SliceConv)


@pytest.mark.parametrize("module_cls", [Plain, WithMixin])
def test_resuming_with_a_conflicting_technique_names_both(tmp_path, loader, module_cls):
    path = _fit(tmp_path, module_cls(), [BandLimiting(compress_rate=50)], loader, "band.ckpt")
    with pytest.raises(ConversionMismatchError, match=r"converted by band_limit\(.*this model by slice_generate"):
        _trainer(tmp_path, [ConvSliceGeneration(code_size=16)], max_steps=2).fit(
            module_cls(), loader, ckpt_path=path
        )


def test_resuming_a_plain_checkpoint_with_a_technique_fails(tmp_path, loader):
    path = _fit(tmp_path, Plain(), [], loader, "plain.ckpt")
    with pytest.raises(ConversionMismatchError, match=r"no conversion \(plain layers\), this model by band_limit"):
        _trainer(tmp_path, [BandLimiting()], max_steps=2).fit(Plain(), loader, ckpt_path=path)


def test_mixin_load_from_checkpoint_still_rebuilds(tmp_path, loader):
    trained = WithMixin()
    path = _fit(tmp_path, trained, [ConvSliceGeneration(code_size=16)], loader, "csg.ckpt")
    assert torch.load(path, weights_only=True)[CHECKPOINT_KEY][0]["technique"] == "slice_generate"
    loaded = WithMixin.load_from_checkpoint(path)
    assert isinstance(loaded.net[2], SliceConv)
