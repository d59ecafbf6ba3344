"""slice_generate / fold_slices: selection, parameter counts, initialization, export, replay."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_memcomp import fold_slices, slice_generate
from lightning_memcomp.checkpoint import conversions_of, restore_conversions
from lightning_memcomp.csg import GENERATOR_NAME, SliceConv, SliceConv3d, SliceGenerator
from lightning_memcomp.surgery import count_parameters
from recipes.classification.networks_cifar import resnet56_cifar, resnet_cifar_he


def _paper_count(model: nn.Module, slice_shape: tuple[int, ...], code_size: int, generator_trained: bool) -> int:
    """Omidvar et al.'s count, from the unconverted model: codes of every 3x3 conv but the first, + generator."""
    s0, s1 = slice_shape[:2]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    converted = [m for m in convs[1:] if m.kernel_size == tuple(slice_shape[2:])]
    others = sum(p.numel() for p in model.parameters()) - sum(m.weight.numel() for m in converted)
    codes = sum(math.ceil(m.out_channels / s0) * math.ceil(m.in_channels / s1) * code_size for m in converted)
    return others + codes + (math.prod(slice_shape) * code_size if generator_trained else 0)


# the paper's Table 1 (CIFAR-10 ResNet-56): an independent check of the formula and of the network
RESNET56_CONFIGS = [
    pytest.param({"slice_shape": (16, 16, 3, 3), "code_size": 128}, True, 347_162, id="CSG-16-128"),
    pytest.param({"slice_shape": (12, 12, 3, 3), "code_size": 72}, True, 160_450, id="CSG-12-72"),
    pytest.param({"slice_shape": (16, 16, 3, 3), "code_size": 1024, "binary": True}, False, 381_978, id="BCSG-16-1024"),
]


def test_resnet56_baseline_has_the_papers_parameter_count() -> None:
    assert count_parameters(resnet56_cifar()) == 853_018


@pytest.mark.parametrize(("options", "generator_trained", "paper"), RESNET56_CONFIGS)
def test_resnet56_trainable_parameters_follow_the_formula(options, generator_trained, paper) -> None:
    model = resnet56_cifar()
    expected = _paper_count(model, options["slice_shape"], options["code_size"], generator_trained)
    report = slice_generate(model, **options)
    assert count_parameters(model) == expected == report.params_after == paper
    assert report.params_before == 853_018
    assert report.param_ratio == pytest.approx(853_018 / paper)


def test_pretrained_frozen_generator_leaves_only_codes_trainable() -> None:
    donor = resnet_cifar_he(20)
    slice_generate(donor, slice_shape=(16, 16, 3, 3), code_size=128)
    model = resnet56_cifar()
    expected = _paper_count(model, (16, 16, 3, 3), 128, generator_trained=False)
    report = slice_generate(model, generator=donor)
    assert report.params_after == expected == 52_250  # Table 1: "w/ pre-trained CSG on ResNet-20"
    torch.testing.assert_close(getattr(model, GENERATOR_NAME).weight, getattr(donor, GENERATOR_NAME).weight)


def test_first_and_pointwise_convolutions_stay_ordinary_by_default(small_cnn) -> None:
    model = small_cnn()
    report = slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=16)
    assert [c.name for c in report.converted] == ["conv1", "conv2"]
    assert type(model.stem) is nn.Conv2d and type(model.mix) is nn.Conv2d
    assert {s.name: s.reason for s in report.skipped}.keys() == {"stem", "mix"}
    assert "first convolution" in next(s.reason for s in report.skipped if s.name == "stem")


def test_a_pointwise_slice_converts_pointwise_convolutions(small_cnn) -> None:
    model = small_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = slice_generate(model, slice_shape=(8, 8, 1, 1), code_size=4)
    assert [c.name for c in report.converted] == ["mix"]


def test_explicit_selection_converts_only_the_selected_convolutions(small_cnn) -> None:
    model = small_cnn()
    report = slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=16, modules=["stem", "conv2", "bn1"])
    assert [c.name for c in report.converted] == ["stem", "conv2"]
    assert type(model.conv1) is nn.Conv2d


def test_generator_appears_once_in_parameters_and_state_dict(small_cnn) -> None:
    model = small_cnn()
    slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=16)
    gen = getattr(model, GENERATOR_NAME)
    assert sum(p is gen.weight for p in model.parameters()) == 1
    assert [k for k in model.state_dict() if k.endswith(".weight") and "generator" in k] == [
        f"{GENERATOR_NAME}.weight"
    ]
    assert model.conv1.generator is gen and model.conv2.generator is gen


def test_conversion_is_idempotent(small_cnn) -> None:
    model = small_cnn()
    slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=16)
    params = count_parameters(model)
    again = slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=16)
    assert again.converted == [] and again.already_converted == ["conv1", "conv2"]
    assert count_parameters(model) == params
    assert len(conversions_of(model)) == 1


def test_a_second_generator_is_rejected(small_cnn) -> None:
    model = small_cnn()
    slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=16, modules="conv1")
    with pytest.raises(ValueError, match="code_size=8 disagrees"):
        slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=8, modules="conv2")
    with pytest.raises(ValueError, match="one generator per network"):
        slice_generate(model, generator=SliceGenerator((8, 8, 3, 3), 16), modules="conv2")


def test_converting_more_layers_later_reuses_the_generator(small_cnn) -> None:
    model = small_cnn()
    slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=16, modules="conv1")
    report = slice_generate(model, modules="conv2")
    assert [c.name for c in report.converted] == ["conv2"]
    assert model.conv2.generator is model.conv1.generator is getattr(model, GENERATOR_NAME)


def test_a_slice_shape_that_fits_no_layer_warns_with_the_kernel_sizes_found(small_cnn) -> None:
    model = small_cnn()
    with pytest.warns(UserWarning, match=r"kernel sizes found: \(1, 1\), \(3, 3\)"):
        report = slice_generate(model, slice_shape=(8, 8, 5, 5), code_size=16, modules="Conv2d")
    assert report.converted == []
    assert not hasattr(model, GENERATOR_NAME)
    assert conversions_of(model) == []


def test_an_explicitly_selected_layer_that_cannot_convert_warns(small_cnn) -> None:
    model = small_cnn()
    with pytest.warns(UserWarning, match=r"mix \(Conv2d\): kernel \(1, 1\)"):
        report = slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=16, modules=["conv1", "mix"])
    assert [c.name for c in report.converted] == ["conv1"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"slice_shape": (8, 0, 3, 3)}, "slice_shape"),
        ({"code_size": 0}, "code_size"),
        ({"init": "zeros"}, "init='zeros'"),
        ({"binary": True, "init": "fit"}, "binary generator"),
        ({"binary": True, "train_generator": True}, "binary=True"),
    ],
)
def test_invalid_options_raise_naming_the_option(small_cnn, options, match) -> None:
    model = small_cnn()
    with pytest.raises(ValueError, match=match):
        slice_generate(model, **options)
    assert not any(isinstance(m, SliceConv) for m in model.modules())


def test_fit_with_a_pretrained_binary_generator_is_rejected(small_cnn) -> None:
    with pytest.raises(ValueError, match="binary generator"):
        slice_generate(small_cnn(), generator=SliceGenerator((8, 8, 3, 3), 16, binary=True), binary=True, init="fit")


def test_report_gives_generator_and_code_parameters(small_cnn) -> None:
    model = small_cnn()
    report = slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=16)
    assert report.extra["generator_parameters"] == 8 * 8 * 9 * 16
    assert report.extra["code_parameters"] == (4 * 2 + 4 * 4) * 16  # conv1 16->32, conv2 32->32
    assert report.params_after == report.params_before - 32 * 16 * 9 - 32 * 32 * 9 + 576 * 16 + 24 * 16


def test_fit_init_reports_a_relative_error_below_a_scratch_conversion(small_cnn) -> None:
    torch.manual_seed(1)
    original = small_cnn()
    fitted, scratch = copy.deepcopy(original), copy.deepcopy(original)
    report = slice_generate(fitted, slice_shape=(8, 8, 3, 3), code_size=16, init="fit")
    slice_generate(scratch, slice_shape=(8, 8, 3, 3), code_size=16)

    def error(model: nn.Module) -> float:
        num = sum((model.get_submodule(n).generate_weight() - original.get_submodule(n).weight).detach().norm() ** 2
                  for n in ("conv1", "conv2"))
        den = sum(original.get_submodule(n).weight.detach().norm() ** 2 for n in ("conv1", "conv2"))
        return float((num / den).sqrt())

    assert report.extra["fit_relative_error"] == pytest.approx(error(fitted), rel=1e-4)
    assert error(fitted) < 0.9 < error(scratch)
    assert all("fit_error" in c.details for c in report.converted)


def test_fit_init_is_exact_when_the_code_size_covers_every_slice(small_cnn) -> None:
    model = small_cnn()
    original = copy.deepcopy(model)
    report = slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=24, init="fit")  # 24 slices in all
    assert report.extra["fit_relative_error"] < 1e-5
    x = torch.randn(2, 1, 32, 32)
    model.eval(), original.eval()
    torch.testing.assert_close(model(x), original(x), atol=1e-4, rtol=1e-4)


def test_fold_slices_gives_equal_outputs_and_loads_into_the_unconverted_architecture(small_cnn) -> None:
    model = small_cnn()
    slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=16)
    model.eval()
    folded = fold_slices(model)
    assert not any(isinstance(m, (SliceConv, SliceGenerator)) for m in folded.modules())
    plain = small_cnn().eval()
    plain.load_state_dict(folded.state_dict())  # strict: the same keys as the unconverted model
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, SliceConv) for m in model.modules())  # not in place by default


def test_fold_slices_drops_the_conversion_record(small_cnn) -> None:
    model = small_cnn()
    slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=16)
    folded = fold_slices(model, inplace=True)
    assert folded is model and conversions_of(model) == []


def test_recorded_conversion_rebuilds_the_structure_on_a_fresh_model(small_cnn) -> None:
    model = small_cnn()
    slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=16, binary=True, modules=["conv1", "conv2", "stem"])
    fresh = small_cnn()
    restore_conversions(fresh, conversions_of(model))
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(fresh(x), model(x))
    assert getattr(fresh, GENERATOR_NAME).binary and count_parameters(fresh) == count_parameters(model)


def test_recorded_conversion_replays_a_fit_as_a_scratch_structure(small_cnn) -> None:
    model = small_cnn()
    slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=16, init="fit")
    (spec,) = conversions_of(model)
    assert spec["options"]["init"] == "kaiming" and spec["options"]["modules"] == ["conv1", "conv2"]


# -- training (acceptance) ---------------------------------------------------------------------------

_TRAINED: dict[str, tuple[dict[str, torch.Tensor], float]] = {}


@pytest.fixture
def trained_baseline(small_cnn, train_digits) -> tuple[dict[str, torch.Tensor], float]:
    """The unconverted SmallCNN trained 3 epochs on digits (seed 0), computed once per process."""
    if "baseline" not in _TRAINED:
        torch.manual_seed(0)
        model = small_cnn()
        accuracy = train_digits(model, epochs=3, seed=0)
        _TRAINED["baseline"] = (copy.deepcopy(model.state_dict()), accuracy)
    return _TRAINED["baseline"]


@pytest.mark.slow
def test_csg_trains_digits_within_two_points_with_fewer_parameters(small_cnn, train_digits, trained_baseline) -> None:
    _, baseline_accuracy = trained_baseline
    torch.manual_seed(0)
    model = small_cnn()
    report = slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=16)
    accuracy = train_digits(model, epochs=3, seed=0)
    assert report.params_after < report.params_before
    assert accuracy >= baseline_accuracy - 0.02, (accuracy, baseline_accuracy)


@pytest.mark.slow
def test_fit_init_on_a_trained_network_starts_at_a_lower_loss_than_scratch(small_cnn, digits, trained_baseline) -> None:
    state, _ = trained_baseline
    x, y = digits["test"]
    losses = {}
    for init in ("fit", "kaiming"):
        model = small_cnn()
        model.load_state_dict(state)
        slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=16, init=init)
        with torch.no_grad():
            losses[init] = F.cross_entropy(model.eval()(x), y).item()
    assert losses["fit"] < losses["kaiming"]


@pytest.mark.gpu
def test_conversion_on_cuda_keeps_generator_codes_and_fit_on_the_device(small_cnn) -> None:
    model = small_cnn().cuda()
    original = copy.deepcopy(model).eval()
    report = slice_generate(model, slice_shape=(8, 8, 3, 3), code_size=24, init="fit")
    assert getattr(model, GENERATOR_NAME).weight.is_cuda and model.conv1.codes.is_cuda
    assert report.extra["fit_relative_error"] < 1e-4
    x = torch.randn(2, 1, 32, 32, device="cuda")
    model.eval()
    torch.testing.assert_close(model(x), original(x), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(fold_slices(model)(x), model(x), atol=1e-5, rtol=1e-5)


# -- default slice shapes for 1-D, 2-D and 3-D networks ---------------------------------------------------


def test_default_slice_follows_the_dimensionality_of_the_network():
    from lightning_memcomp.csg import DEFAULT_SLICE_SHAPES, default_slice_shape

    one_d = nn.Sequential(nn.Conv1d(1, 16, 3), nn.Conv1d(16, 16, 3), nn.Conv1d(16, 16, 3))
    report = slice_generate(one_d)
    assert report.extra["slice_shape"] == [16, 16, 3] and len(report.converted) == 2
    mixed = nn.ModuleDict({"a": nn.Conv2d(1, 4, 3), "b": nn.Conv3d(4, 4, 3), "c": nn.Conv3d(4, 4, 3),
                           "d": nn.Conv3d(4, 4, 1)})
    assert default_slice_shape(mixed) == DEFAULT_SLICE_SHAPES[3] == (16, 16, 3, 3, 3)  # most kxk convs are 3-D
    assert default_slice_shape(mixed, modules="a") == (16, 16, 3, 3)
    assert default_slice_shape(nn.Linear(2, 2)) == (16, 16, 3, 3)


#: the issue's 3-D network (MONAI's 3-D segmentation tutorial)
UNET3D = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": (16, 32, 64, 128), "strides": (2, 2, 2),
          "num_res_units": 2}


def test_defaults_convert_the_3d_convolutions_of_a_monai_unet_and_train():
    net = pytest.importorskip("monai.networks.nets").UNet(**UNET3D)
    x = torch.randn(1, 1, 16, 16, 16)
    with pytest.warns(UserWarning, match="ConvTranspose3d.*transposed convolutions are not supported"):
        report = slice_generate(net)
    assert report.extra["slice_shape"] == [16, 16, 3, 3, 3]
    converted = [m for m in net.modules() if isinstance(m, SliceConv3d)]
    assert len(report.converted) == len(converted) == 13  # every 3x3x3 conv but the first
    y = net(x)
    assert y.shape == (1, 2, 16, 16, 16)
    y.square().mean().backward()
    assert all(m.codes.grad is not None and m.codes.grad.abs().sum() > 0 for m in converted)
    assert net.memcomp_slice_generator.weight.grad.abs().sum() > 0


def test_a_converted_sequential_warns_and_its_forward_fails_with_the_reason():
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.Conv2d(16, 16, 3))
    with pytest.warns(UserWarning, match="registered on the converted Sequential.*convert a module that holds it"):
        slice_generate(model, code_size=8)
    with pytest.raises(ValueError, match=r"got an input of shape \(1, 16, 4, 4\).*stage of an nn.Sequential"):
        model(torch.randn(1, 1, 8, 8))
    holder = nn.Module()
    holder.body = nn.Sequential(nn.Conv2d(1, 16, 3), nn.Conv2d(16, 16, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slice_generate(holder, code_size=8)
    assert holder.body(torch.randn(1, 1, 8, 8)).shape == (1, 16, 4, 4)
