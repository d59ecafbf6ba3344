"""Techniques by name: parsing ``--technique`` specs, replacing a config's callbacks, naming a run's technique,
and the ``checkpoint`` technique's callback (gradients equal to plain PyTorch's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lightning_memcomp.recompute import ActivationCheckpointing, checkpoint_forward, select_blocks
from lightning_memcomp.techniques import (
    TECHNIQUE_CALLBACKS,
    apply_technique,
    parse_technique,
    run_name,
    technique_of,
)

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"


@pytest.mark.parametrize(
    ("spec", "classes", "precision"),
    [
        ("quant:4", ["ActivationCompression"], None),
        ("csg+quant:4", ["ConvSliceGeneration", "ActivationCompression"], None),
        ("quant:4+csg", ["ConvSliceGeneration", "ActivationCompression"], None),
        ("bandlimit:50", ["BandLimiting"], None),
        ("checkpoint+bf16", ["ActivationCheckpointing"], "bf16-mixed"),
        ("bf16", [], "bf16-mixed"),
        ("baseline", [], None),
    ],
)
def test_a_spec_becomes_the_callbacks_that_run_it(spec: str, classes: list[str], precision: str | None) -> None:
    technique = parse_technique(spec)
    added = apply_technique([], technique)
    assert [e["class_path"].rsplit(".", 1)[-1] for e in added] == classes  # conversions before compression
    assert technique.precision == precision


def test_codec_settings_reach_the_callback_options() -> None:
    (quant,) = parse_technique("quant:2").callbacks
    assert quant["init_args"] == {"codec": "quant", "bits": 2}
    (dct,) = parse_technique("dct:12.5").callbacks
    assert dct["init_args"] == {"codec": "dct"} and dct["dict_kwargs"] == {"compression_ratio": 12.5}
    (band,) = parse_technique("bandlimit:85").callbacks
    assert band["init_args"] == {"compress_rate": 85}
    assert parse_technique("bcsg").callbacks[0]["init_args"] == {"binary": True}
    assert parse_technique(" CSG + Quant:4 ").spec == "csg+quant:4"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("quant:3", r"--technique='quant:3': bits=3 is not allowed; use one of 1, 2, 4, 8"),
        ("quant", r"quant needs its bits"),
        ("foo", r"'foo' is not known; allowed: baseline, bf16, checkpoint"),
        ("floor:2", r"floor is a benchmark stand-in"),
        ("quant:4+dct:10", r"2 activation codecs \(quant:4, dct:10\)"),
        ("csg+csg", r"names csg twice"),
        ("baseline+quant:4", r"baseline means no technique"),
        ("quant:4+", r"is not allowed; use baseline"),
        ("", r"is not allowed; use baseline"),
    ],
)
def test_bad_specs_are_refused_naming_the_option(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_technique(spec)


def test_replacing_keeps_other_callbacks_and_the_options_of_the_same_technique() -> None:
    config = yaml.safe_load((CONFIGS / "digits_csg.yaml").read_text())
    callbacks = config["trainer"]["callbacks"]
    out = apply_technique(callbacks, parse_technique("csg+quant:4"))
    names = [e["class_path"].rsplit(".", 1)[-1] for e in out]
    assert names == ["ConvSliceGeneration", "ActivationCompression", "MemoryMonitor"]
    assert out[0]["init_args"]["code_size"] == 32  # the config's CSG options are kept

    quant = {"class_path": "ActivationCompression", "init_args": {"codec": "quant", "bits": 4, "modules": ["Conv2d"]},
             "dict_kwargs": {"group_size": 256}}
    to_dct = apply_technique([quant], parse_technique("dct:10"))[0]
    assert to_dct["init_args"] == {"modules": ["Conv2d"], "codec": "dct"}  # engine options carry over
    assert to_dct["dict_kwargs"] == {"compression_ratio": 10}  # the quant codec's group_size does not
    to_quant2 = apply_technique([quant], parse_technique("quant:2"))[0]
    assert to_quant2["init_args"]["bits"] == 2 and to_quant2["dict_kwargs"] == {"group_size": 256}
    assert apply_technique([quant], parse_technique("baseline")) == []


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_names_its_technique_and_the_spec_rebuilds_its_callbacks(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    spec = technique_of(config)
    expected = {"baseline": "baseline", "bandlimit": "bandlimit:50", "csg": "csg", "blpa4": "blpa:4",
                "quant2": "quant:2", "quant4": "quant:4", "wavelet": "wavelet:10", "dct": "dct:10",
                "threshold": "threshold:4", "combined": "csg+quant:4"}[path.stem.rsplit("_", 1)[-1]]
    assert spec == expected
    rebuilt = apply_technique(config["trainer"]["callbacks"], parse_technique(spec))
    assert technique_of({"trainer": {"callbacks": rebuilt}}) == spec


def test_technique_of_reads_strategies_precision_and_the_saved_option() -> None:
    assert technique_of({"technique": "csg+quant:4", "trainer": {}}) == "csg+quant:4"
    assert technique_of({"trainer": {"strategy": "memcomp"}}) == "quant:4 (strategy)"
    strategy = {"class_path": "lightning_memcomp.DDPMemCompStrategy", "init_args": {"codec": "blpa", "bits": 2}}
    assert technique_of({"trainer": {"strategy": strategy}}) == "blpa:2 (strategy)"
    assert technique_of({"trainer": {"precision": "bf16-mixed", "callbacks": []}}) == "bf16"
    assert technique_of({"trainer": {"callbacks": [{"class_path": "ActivationCompression"}]}}) == "quant:4"
    assert technique_of({}) == "baseline"


def test_run_names_follow_the_technique() -> None:
    assert run_name("digits_baseline", parse_technique("quant:4")) == "digits_quant4"
    assert run_name("synthetic_seg_combined", parse_technique("csg+dct:10")) == "synthetic_seg_csg_dct10"
    assert run_name("my_experiment", parse_technique("blpa:2")) == "my_experiment_blpa2"
    assert run_name("", parse_technique("checkpoint")) == "checkpoint"
    assert set(TECHNIQUE_CALLBACKS) == {"ActivationCompression", "BandLimiting", "ConvSliceGeneration",
                                        "ActivationCheckpointing"}


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))) + x


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Block(8), _Block(8), nn.Flatten(), nn.Linear(8 * 64, 4))


def test_checkpointed_blocks_give_plain_pytorchs_gradients_and_keep_the_state_dict() -> None:
    plain, ckpt = _net(), _net()
    keys = list(plain.state_dict())
    assert checkpoint_forward(ckpt) == ["1", "2"]
    assert list(ckpt.state_dict()) == keys  # names unchanged: checkpoints load into the plain model
    x = torch.randn(4, 3, 8, 8)
    for model in (plain, ckpt):
        model(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        # measured max difference 0 (same kernels, same order); margin for a different BLAS split
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert checkpoint_forward(ckpt) == ["1", "2"]  # idempotent: not wrapped twice


def test_checkpointing_recomputes_in_backward() -> None:
    model = _net()
    calls = []
    model[1].conv.register_forward_hook(lambda *_: calls.append(1))
    checkpoint_forward(model)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert len(calls) == 2  # forward, and again when backward reaches the block
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
    assert len(calls) == 3  # plain in eval


def test_a_selection_that_matches_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match=r"modules=\['NoSuchBlock'\] matched no block of Sequential"):
        select_blocks(_net(), ["NoSuchBlock"])
    with pytest.raises(TypeError, match="modules"):
        ActivationCheckpointing(modules=[3])  # type: ignore[list-item]


def test_a_deep_copy_of_a_checkpointed_model_runs_its_own_blocks() -> None:
    import copy

    model = _net()
    checkpoint_forward(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    x = torch.randn(2, 3, 8, 8)
    calls = []
    model[1].conv.register_forward_hook(lambda *_: calls.append("original"))
    twin(x).sum().backward()
    assert calls == []  # the copy's patched forward is bound to the copy, not to the original block
    assert all(p.grad is None for p in model.parameters())
