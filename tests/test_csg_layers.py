"""Slice-generated convolutions: layout, cropping, options, initialization, gradients."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_memcomp.csg import (
    GENERATOR_NAME,
    SliceConv,
    SliceConv1d,
    SliceConv2d,
    SliceConv3d,
    SliceGenerator,
    slice_generate,
)


def test_codes_shape_follows_ceil_formula_for_fractional_channels() -> None:
    gen = SliceGenerator((8, 8, 3, 3), code_size=5)
    layer = SliceConv2d(10, 20, 3, gen)  # ceil(20/8) * ceil(10/8) = 3 * 2 slices
    assert layer.codes.shape == (6, 5)
    assert layer.generate_weight().shape == (20, 10, 3, 3)


def test_slice_i_fills_output_block_o_and_input_block_j() -> None:
    s0, s1 = 4, 3
    gen = SliceGenerator((s0, s1, 3, 3), code_size=5)
    layer = SliceConv2d(7, 10, 3, gen)  # 3 output blocks x 3 input blocks, both cropped at the end
    weight = layer.generate_weight().detach()
    n_in = math.ceil(7 / s1)
    for i, code in enumerate(layer.codes.detach()):
        o, j = divmod(i, n_in)
        full_slice = (gen.weight.detach() @ code).reshape(s0, s1, 3, 3)
        block = weight[o * s0 : (o + 1) * s0, j * s1 : (j + 1) * s1]
        torch.testing.assert_close(block, full_slice[: block.shape[0], : block.shape[1]])


CONV_OPTIONS = [
    (nn.Conv1d, dict(in_channels=6, out_channels=10, kernel_size=3, stride=2, padding=1, dilation=2)),
    (nn.Conv1d, dict(in_channels=6, out_channels=10, kernel_size=3, padding="same", padding_mode="circular")),
    (nn.Conv2d, dict(in_channels=6, out_channels=10, kernel_size=3, stride=2, padding=2, dilation=2, bias=False)),
    (nn.Conv2d, dict(in_channels=6, out_channels=12, kernel_size=3, padding=1, groups=3, padding_mode="reflect")),
    (nn.Conv2d, dict(in_channels=5, out_channels=9, kernel_size=(3, 1), padding="same", padding_mode="replicate")),
    (nn.Conv3d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=(1, 2, 2), padding=1)),
    (nn.Conv3d, dict(in_channels=4, out_channels=6, kernel_size=(1, 3, 3), padding="valid", groups=2)),
]


@pytest.mark.parametrize(("conv_type", "options"), CONV_OPTIONS)
def test_converted_conv_keeps_every_option(conv_type, options) -> None:
    conv = conv_type(**options)
    kernel = conv.kernel_size
    gen = SliceGenerator((4, 4, *kernel), code_size=6)
    layer = SliceConv.from_conv(conv, gen)
    assert isinstance(layer, {1: SliceConv1d, 2: SliceConv2d, 3: SliceConv3d}[len(kernel)])
    with torch.no_grad():
        conv.weight.copy_(layer.generate_weight())
    x = torch.randn(2, options["in_channels"], *([9] * len(kernel)))
    torch.testing.assert_close(layer(x), conv(x))


def test_converted_conv_shares_the_original_bias_parameter() -> None:
    conv = nn.Conv2d(4, 8, 3)
    layer = SliceConv.from_conv(conv, SliceGenerator((4, 4, 3, 3), code_size=6))
    assert layer.bias is conv.bias


def test_from_conv_rejects_a_kernel_that_does_not_match_the_slice() -> None:
    with pytest.raises(ValueError, match=r"kernel \(5, 5\)"):
        SliceConv.from_conv(nn.Conv2d(4, 8, 5), SliceGenerator((4, 4, 3, 3), code_size=6))
    with pytest.raises(ValueError, match="trailing dimensions"):
        SliceConv.from_conv(nn.Conv1d(4, 8, 3), SliceGenerator((4, 4, 3, 3), code_size=6))


def test_from_conv_rejects_transposed_convolutions() -> None:
    with pytest.raises(ValueError, match="transposed"):
        SliceConv.from_conv(nn.ConvTranspose2d(4, 8, 3), SliceGenerator((4, 4, 3, 3), code_size=6))


@pytest.mark.parametrize("binary", [False, True])
def test_scratch_filters_have_kaiming_variance(binary: bool) -> None:
    gen = SliceGenerator((16, 16, 3, 3), code_size=128, binary=binary)
    layer = SliceConv2d(64, 128, 3, gen)
    expected = 2.0 / (64 * 9)  # nn.init.kaiming_normal_: fan_in, ReLU gain
    assert layer.generate_weight().var().item() == pytest.approx(expected, rel=0.15)


def test_scratch_filters_have_kaiming_variance_with_a_pretrained_generator_of_any_scale() -> None:
    gen = SliceGenerator((16, 16, 3, 3), code_size=32)
    with torch.no_grad():
        gen.weight.mul_(25.0)
    layer = SliceConv2d(64, 64, 3, gen.freeze())
    assert layer.generate_weight().var().item() == pytest.approx(2.0 / (64 * 9), rel=0.15)


def test_gradients_reach_codes_and_a_trainable_generator() -> None:
    gen = SliceGenerator((4, 4, 3, 3), code_size=6)
    layers = nn.Sequential(SliceConv2d(4, 8, 3, gen), nn.ReLU(), SliceConv2d(8, 8, 3, gen))
    layers(torch.randn(2, 4, 9, 9)).square().mean().backward()
    assert layers[0].codes.grad.abs().sum() > 0
    assert layers[2].codes.grad.abs().sum() > 0
    assert gen.weight.grad is not None and gen.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["binary", "frozen"])
def test_binary_or_frozen_generator_does_not_change_over_training_steps(kind: str) -> None:
    gen = SliceGenerator((4, 4, 3, 3), code_size=6, binary=kind == "binary")
    if kind == "frozen":
        gen.freeze()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), SliceConv2d(4, 8, 3, gen), nn.Flatten(), nn.Linear(200, 2))
    root = nn.ModuleDict({"net": model, GENERATOR_NAME: gen})  # every parameter, generator included
    before_gen, before_codes = gen.weight.detach().clone(), model[1].codes.detach().clone()
    opt = torch.optim.SGD(root.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        loss = F.cross_entropy(model(torch.randn(4, 3, 9, 9)), torch.randint(0, 2, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(gen.weight, before_gen, rtol=0, atol=0)
    assert not torch.equal(model[1].codes, before_codes)


def test_fit_reproduces_a_weight_within_the_generators_span() -> None:
    gen = SliceGenerator((4, 4, 3, 3), code_size=6)
    source = SliceConv2d(6, 10, 3, gen)
    conv = nn.Conv2d(6, 10, 3)
    with torch.no_grad():
        conv.weight.copy_(source.generate_weight())
    layer = SliceConv.from_conv(conv, gen, init="fit")
    assert layer.fit_error < 1e-5
    torch.testing.assert_close(layer.generate_weight(), conv.weight, atol=1e-5, rtol=1e-4)


def test_to_conv_gives_identical_outputs() -> None:
    layer = SliceConv2d(6, 10, 3, SliceGenerator((4, 4, 3, 3), code_size=6), stride=2, padding=1)
    conv = layer.to_conv()
    assert type(conv) is nn.Conv2d
    x = torch.randn(2, 6, 11, 11)
    torch.testing.assert_close(conv(x), layer(x), atol=1e-5, rtol=1e-5)


def test_generator_is_referenced_not_registered_as_a_child() -> None:
    gen = SliceGenerator((4, 4, 3, 3), code_size=6)
    layer = SliceConv2d(4, 8, 3, gen)
    assert layer.generator is gen
    assert dict(layer.named_parameters()).keys() == {"codes", "bias"}
    assert list(layer.children()) == []


class _Holder(nn.Module):
    """A model holding a Sequential (a converted nn.Sequential itself would run its generator as a stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def __getitem__(self, index: int) -> nn.Module:
        return self.body[index]


def _converted_model() -> nn.Module:
    model = _Holder()
    slice_generate(model, slice_shape=(4, 4, 3, 3), code_size=6)
    return model


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_copies_keep_one_generator_shared_by_their_layers(clone) -> None:
    model = _converted_model()
    copied = clone(model)
    root_gen = getattr(copied, GENERATOR_NAME)
    assert root_gen is not getattr(model, GENERATOR_NAME)
    assert copied[1].generator is root_gen and copied[2].generator is root_gen
    x = torch.randn(1, 3, 12, 12)
    torch.testing.assert_close(copied(x), model(x))


def test_moving_the_model_moves_the_shared_generator() -> None:
    model = _converted_model().to(torch.float64)
    assert model[1].generator.weight.dtype == torch.float64
    assert model(torch.randn(1, 3, 12, 12, dtype=torch.float64)).dtype == torch.float64
