"""``band_limit``: selection, report, idempotence, checkpoint replay, and the digits training acceptance."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lightning_memcomp
from lightning_memcomp.bandlimit import BandLimitedConv1d, BandLimitedConv2d, BandLimitedConv3d, band_limit
from lightning_memcomp.checkpoint import CHECKPOINT_KEY, conversions_of, restore_conversions
from recipes.classification.networks_cifar import resnet18_cifar


def _names_of(model: nn.Module, cls: type) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, cls)}


def test_band_limit_is_exported_from_the_package():
    assert lightning_memcomp.band_limit is band_limit


def test_default_converts_every_kxk_conv_including_the_stem_and_leaves_1x1_alone(small_cnn):
    model = small_cnn()
    report = band_limit(model)
    assert {c.name for c in report.converted} == {"stem", "conv1", "conv2"}
    assert isinstance(model.mix, nn.Conv2d) and not isinstance(model.mix, BandLimitedConv2d)
    assert all(c.details["compress_rate"] == 50 for c in report.converted)


def test_default_on_resnet18_leaves_the_1x1_shortcuts_alone():
    model = resnet18_cifar()
    report = band_limit(model)
    assert len(report.converted) == 17  # stem + 16 block convs
    assert {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)} == {
        f"layer{i}.0.shortcut.0" for i in (2, 3, 4)
    }


def test_converted_model_keeps_its_parameters(small_cnn):
    model = small_cnn()
    before = {n: p for n, p in model.named_parameters()}
    band_limit(model)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(after[n] is p for n, p in before.items())


def test_example_input_fills_the_realized_compression_per_layer(small_cnn):
    model = small_cnn().train()
    report = band_limit(model, compress_rate=50, example_input=torch.randn(2, 1, 32, 32))
    realized = {c.name: c.details["realized_compression"] for c in report.converted}
    assert realized["stem"] == pytest.approx(model.stem.compression_for((32, 32)))
    assert realized["conv2"] == pytest.approx(model.conv2.compression_for((16, 16)))
    assert all(abs(v - 0.5) < 0.06 for v in realized.values())
    assert model.training and model.bn0.training  # the probe restored the modes
    assert model.bn0.num_batches_tracked.item() == 0  # and left batch-norm statistics alone


def test_without_example_input_realized_compression_is_unknown_until_a_forward(small_cnn):
    model = small_cnn()
    report = band_limit(model, compress_rate=25)
    assert all(c.details["realized_compression"] is None for c in report.converted)
    model(torch.randn(1, 1, 32, 32))
    assert model.stem.realized_compression == pytest.approx(model.stem.compression_for((32, 32)))


def test_conversion_is_idempotent(small_cnn):
    model = small_cnn()
    band_limit(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = band_limit(model)
    assert not second.converted
    assert set(second.already_converted) == {"stem", "conv1", "conv2"}
    assert len(conversions_of(model)) == 1


def test_grouped_dilated_and_reflect_padded_convs_are_skipped_with_a_warning():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Conv2d(4, 4, 3, dilation=2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 4, 3),
    )
    with pytest.warns(UserWarning, match="skipping"):
        report = band_limit(model)
    assert [c.name for c in report.converted] == ["3"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert "groups=2" in reasons["0"] and "dilation=" in reasons["1"] and "padding_mode='reflect'" in reasons["2"]


def test_conv_subclass_with_its_own_forward_is_skipped():
    class Standardized(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(Standardized(1, 1, 3))
    with pytest.warns(UserWarning, match="own forward"):
        report = band_limit(model)
    assert not report.converted and report.skipped


def test_explicit_selection_can_convert_a_1x1_conv(small_cnn):
    model = small_cnn()
    report = band_limit(model, modules=["mix"])
    assert [c.name for c in report.converted] == ["mix"]
    assert isinstance(model.mix, BandLimitedConv2d)


def test_conv1d_and_conv3d_are_converted_by_default():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Sequential(nn.Conv3d(1, 2, 3)))
    band_limit(model)
    assert isinstance(model[0], BandLimitedConv1d) and isinstance(model[1][0], BandLimitedConv3d)


def test_invalid_options_fail_before_any_layer_changes(small_cnn):
    model = small_cnn()
    with pytest.raises(ValueError, match="compress_rate=100"):
        band_limit(model, compress_rate=100)
    with pytest.raises(ValueError, match="both given"):
        band_limit(model, compress_rate=10, preserve_energy=90)
    with pytest.raises(ValueError, match="fft_size"):
        band_limit(model, fft_size="pow2")
    assert not _names_of(model, BandLimitedConv2d)


def test_recorded_conversion_rebuilds_the_same_layers_on_a_fresh_model(small_cnn):
    model = small_cnn()
    band_limit(model, preserve_energy=95, modules=lambda m, n: n in ("conv1", "mix"), fft_size="minimal")
    fresh = small_cnn()
    restore_conversions(fresh, {CHECKPOINT_KEY: conversions_of(model)})
    fresh.load_state_dict(model.state_dict())
    assert _names_of(fresh, BandLimitedConv2d) == {"conv1", "mix"}
    assert fresh.conv1.preserve_energy == 95 and fresh.conv1.fft_size == "minimal"
    assert fresh.conv1.energy_levels is fresh.mix.energy_levels  # one host read per batch for the model
    model.eval(), fresh.eval()
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(fresh(x), model(x))
    assert conversions_of(fresh) == conversions_of(model)


def test_converted_model_survives_torch_save_and_load(small_cnn, tmp_path):
    model = small_cnn().eval()
    band_limit(model)
    x = torch.randn(2, 1, 32, 32)
    expected = model(x)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), expected)


@pytest.mark.slow
def test_digits_training_at_compress_rate_50_is_within_2_points_of_nn_conv(small_cnn, train_digits):
    # fft_size="minimal" keeps this test fast; the paper's power-of-two grid is measured in the report
    torch.manual_seed(0)
    reference = small_cnn(width=8)
    banded = copy.deepcopy(reference)
    band_limit(banded, compress_rate=50, fft_size="minimal")
    acc_conv = train_digits(reference, epochs=3, seed=0)
    acc_band = train_digits(banded, epochs=3, seed=0)
    print(f"digits test accuracy: nn.Conv2d {acc_conv:.4f}, band-limited (compress_rate=50) {acc_band:.4f}")
    assert acc_conv > 0.9
    assert acc_band >= acc_conv - 0.02
