"""SliceGenerator: the shared code-to-slice map of CSG/BCSG (Omidvar et al., 2021, eq. 1)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_memcomp.csg import GENERATOR_NAME, SliceGenerator, slice_generate


def test_weight_maps_code_size_to_slice_numel() -> None:
    gen = SliceGenerator((4, 3, 3, 3), code_size=7)
    assert gen.weight.shape == (4 * 3 * 3 * 3, 7)
    assert gen(torch.randn(5, 7)).shape == (5, 108)


def test_generated_slice_is_linear_in_the_code() -> None:
    gen = SliceGenerator((2, 2, 3), code_size=4)
    a, b = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(gen(2 * a - b), 2 * gen(a) - gen(b))


def test_binary_generator_holds_signs_times_scale() -> None:
    gen = SliceGenerator((4, 4, 3, 3), code_size=16, binary=True)
    assert set(gen.weight.unique().tolist()) == {-1 / math.sqrt(16), 1 / math.sqrt(16)}
    both_signs = (gen.weight > 0).float().mean().item()
    assert 0.4 < both_signs < 0.6


def test_binary_generator_scale_option_sets_magnitude() -> None:
    gen = SliceGenerator((2, 2, 3, 3), code_size=8, binary=True, scale=1.0)
    assert gen.weight.abs().unique().tolist() == [1.0]


def test_binary_generator_is_never_trainable() -> None:
    gen = SliceGenerator((2, 2, 3, 3), code_size=8, binary=True)
    assert not gen.trainable
    with pytest.raises(ValueError, match="binary=True with trainable=True"):
        SliceGenerator((2, 2, 3, 3), code_size=8, binary=True, trainable=True)


def test_binary_generator_gets_no_gradient_even_if_requires_grad_is_flipped() -> None:
    gen = SliceGenerator((2, 2, 3, 3), code_size=8, binary=True)
    gen.weight.requires_grad_(True)
    codes = torch.randn(3, 8, requires_grad=True)
    gen(codes).sum().backward()
    assert gen.weight.grad is None
    assert codes.grad is not None


@pytest.mark.parametrize(
    ("slice_shape", "code_size", "match"),
    [
        ((16, 0, 3, 3), 128, "slice_shape"),
        ((16, 16, -3, 3), 128, "slice_shape"),
        ((16, 16, 3, 3), 0, "code_size"),
        ((16, 16, 3, 3), -4, "code_size"),
        ((16, 16), 128, "slice_shape"),
        ((16, 16, 1, 1, 1, 1), 128, "slice_shape"),
        ((16, 16, 3.0, 3), 128, "slice_shape"),
    ],
)
def test_invalid_sizes_are_rejected_naming_the_option(slice_shape, code_size, match) -> None:
    with pytest.raises(ValueError, match=match):
        SliceGenerator(slice_shape, code_size)


def test_fit_codes_recovers_codes_of_generated_slices() -> None:
    gen = SliceGenerator((4, 4, 3, 3), code_size=10)
    codes = torch.randn(6, 10)
    fitted = gen.fit_codes(gen(codes).detach())
    torch.testing.assert_close(fitted.float(), codes, atol=1e-4, rtol=1e-4)


def test_fit_codes_ignores_masked_entries() -> None:
    gen = SliceGenerator((4, 4, 3), code_size=5)
    codes = torch.randn(3, 5)
    slices = gen(codes).detach()
    mask = torch.ones_like(slices, dtype=torch.bool)
    mask[1, :20] = False
    garbage = slices.clone()
    garbage[~mask] = 1e3
    torch.testing.assert_close(gen.fit_codes(garbage, mask).float(), codes, atol=1e-4, rtol=1e-4)


def test_fit_to_slices_spans_data_of_rank_code_size() -> None:
    basis = torch.randn(36, 6)
    data = (basis @ torch.randn(6, 40)).T  # 40 slices in a 6-dimensional subspace
    gen = SliceGenerator((2, 2, 3, 3), code_size=6)
    gen.fit_to_slices_(data)
    approx = gen(gen.fit_codes(data).float()).detach()
    assert (approx - data).norm() / data.norm() < 1e-4


def test_from_pretrained_copies_and_freezes_a_models_generator() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    slice_generate(model, slice_shape=(4, 4, 3, 3), code_size=6)
    source = getattr(model, GENERATOR_NAME)
    gen = SliceGenerator.from_pretrained(model)
    assert gen is not source
    torch.testing.assert_close(gen.weight, source.weight)
    assert not gen.trainable and source.trainable


def test_from_pretrained_reads_a_checkpoint_file(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    slice_generate(model, slice_shape=(4, 4, 3, 3), code_size=6)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)
    gen = SliceGenerator.from_pretrained(path)
    assert gen.slice_shape == (4, 4, 3, 3) and gen.code_size == 6
    torch.testing.assert_close(gen.weight, getattr(model, GENERATOR_NAME).weight)


def test_from_pretrained_keeps_binary_generators_binary() -> None:
    source = SliceGenerator((2, 2, 3, 3), code_size=8, binary=True)
    gen = SliceGenerator.from_pretrained(source.state_dict())
    assert gen.binary
    torch.testing.assert_close(gen.weight, source.weight)


def test_from_pretrained_rejects_a_source_without_generator() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        SliceGenerator.from_pretrained(nn.Conv2d(3, 3, 3).state_dict())
    with pytest.raises(ValueError, match="exactly one"):
        SliceGenerator.from_pretrained(nn.Conv2d(3, 3, 3))


def test_loading_a_generator_of_another_shape_fails() -> None:
    gen = SliceGenerator((2, 2, 3, 3), code_size=8)
    other = SliceGenerator((2, 2, 3, 3), code_size=8)
    other_state = other.state_dict()
    other_state["_extra_state"] = {"slice_shape": [4, 1, 3, 3], "code_size": 8, "binary": False}
    with pytest.raises(ValueError, match="slice_shape"):
        gen.load_state_dict(other_state)
