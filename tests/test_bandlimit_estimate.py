"""Band-limiting's default FFT grid and its estimate of what a conversion holds, checked against what autograd
actually saves; the warning (or refusal) before converting; band-limiting twice."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_memcomp import track_saved_tensors
from lightning_memcomp.bandlimit import BandLimitedConv2d, band_limit
from lightning_memcomp.bandlimit.convert import estimate_band_limit
from lightning_memcomp.bandlimit.functional import FFT_SIZES, BandLimitMemoryError, next_fast_size

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _held(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one forward pass (each storage once), by the ledger."""
    with track_saved_tensors(model, min_bytes=0) as ledger:
        model(x)
    return ledger.raw_bytes


def test_default_fft_grid_is_the_padded_input_and_is_exact():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = BandLimitedConv2d.from_conv(conv, compress_rate=0)
    assert layer.fft_size == "minimal" and set(FFT_SIZES) == {"minimal", "fast", "linear", "power2"}
    assert layer.plan((13, 32)).fft_shape == (15, 34)  # n + 2p: no power-of-two round-up
    x = torch.randn(2, 3, 13, 32, requires_grad=True)
    g = torch.randn(2, 4, 13, 32)
    expected = torch.autograd.grad(conv(x), [x, conv.weight], g)
    actual = torch.autograd.grad(layer(x), [x, layer.weight], g)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_fast_grid_rounds_up_to_small_prime_factors_and_is_exact():
    assert [next_fast_size(n) for n in (1, 11, 13, 17, 34, 64, 66, 97)] == [1, 12, 14, 18, 35, 64, 70, 98]
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    layer = BandLimitedConv2d.from_conv(conv, compress_rate=0, fft_size="fast")
    assert layer.plan((15, 9)).fft_shape == (18, 12)
    x = torch.randn(2, 2, 15, 9)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fft_size", ["minimal", "power2"])
@pytest.mark.parametrize("rate", [0, 50, 90])
def test_layer_estimate_equals_what_autograd_saves(fft_size, rate):
    conv = nn.Conv2d(3, 5, 3, padding=1)
    layer = BandLimitedConv2d.from_conv(conv, compress_rate=rate, fft_size=fft_size, on_larger="ignore")
    x = torch.randn(2, 3, 12, 10)
    est = layer.estimate(x.shape)
    assert est.held_bytes == _held(layer, x)  # the compressed input spectrum, complex64
    assert est.conv_bytes == _held(conv, x)  # nn.Conv2d saves its input
    assert est.fft_shape == layer.plan((12, 10)).fft_shape


class Chain(nn.Module):
    """image -> conv_a (reads the image) -> relu (saves its output) -> conv_b; conv_c also reads the image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(2, 4, 3, padding=1)
        self.conv_c = nn.Conv2d(2, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_b(torch.relu(self.conv_a(x))) + self.conv_c(x)


def test_estimate_knows_which_convolution_inputs_other_layers_keep():
    model = Chain()
    x = torch.randn(2, 2, 16, 16)
    est = {e.name: e for e in estimate_band_limit(model, x).layers}
    assert est["conv_b"].input_shared  # the ReLU keeps its output: band-limiting conv_b frees nothing
    assert not est["conv_a"].input_shared  # only converted layers read x: freed once, counted at conv_a
    assert est["conv_c"].input_shared and est["conv_c"].freed_bytes == 0
    assert est["conv_b"].added_bytes == est["conv_b"].held_bytes
    # the net figure is what the ledger sees change
    base = _held(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        band_limit(model, on_larger="ignore")
    total = estimate_band_limit(Chain(), x)
    assert _held(model, x) - base == total.added_bytes


def test_probe_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))
    model.train()
    estimate_band_limit(model, torch.randn(2, 1, 8, 8))
    assert model.training and model[1].num_batches_tracked.item() == 0
    assert all(isinstance(m, nn.Conv2d) for m in (model[0], model[3]))


def test_holding_more_warns_before_converting_with_the_estimate():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 3, 16, 16)
    message = r"(?s)estimate:.*MiB.*held for backward.*\n.*\b2 at input 2x8x16x16: FFT 64x64"
    with pytest.warns(UserWarning, match=message):
        report = band_limit(model, fft_size="power2", example_input=x)
    est = report.extra["estimate"]
    assert est.holds_more and est.held_bytes > est.conv_bytes
    assert {e.name for e in est.larger} == {"0", "2"}


def test_on_larger_error_refuses_with_the_estimate_and_converts_nothing():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    with pytest.raises(BandLimitMemoryError, match=r"(?s)would hold .* MiB of spectra.*Nothing was converted"):
        band_limit(model, fft_size="power2", example_input=torch.randn(2, 3, 16, 16), on_larger="error")
    assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Conv2d


def test_a_conversion_that_saves_memory_does_not_warn():
    # tanh saves its output, conv 2's input
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = band_limit(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), compress_rate=50, example_input=x)
    assert report.extra["estimate"].added_bytes < 0
    assert estimate_band_limit(model, x).holds_more  # tanh's output is conv 2's input: its spectrum is added


def test_without_an_example_each_layer_checks_at_its_first_forward():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    band_limit(model, compress_rate=50)
    with pytest.warns(UserWarning, match=r"^0 at input 2x3x2x2: FFT 4x4, holds .* \(3\.00x\)"):
        model(torch.randn(2, 3, 2, 2))  # the tiny size where a spectrum is 3x the input
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 3, 2, 2))  # told once per input size
    strict = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    band_limit(strict, compress_rate=50, on_larger="error")
    with pytest.raises(BandLimitMemoryError, match="holds more for backward than the convolution"):
        strict(torch.randn(1, 3, 2, 2))


def test_invalid_on_larger_is_refused():
    with pytest.raises(ValueError, match=r"on_larger='loud' is not allowed; use one of 'warn', 'error', 'ignore'"):
        band_limit(nn.Conv2d(1, 1, 3), on_larger="loud")


def test_band_limiting_twice_with_other_options_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    band_limit(model, compress_rate=50)
    with pytest.raises(ValueError, match=r"already band-limited with other options: 0 \(compress_rate=50.0"):
        band_limit(model, compress_rate=25)
    with pytest.raises(ValueError, match="fft_size='minimal'"):
        band_limit(model, compress_rate=50, fft_size="power2")
    assert model[0].compress_rate == 50
    again = band_limit(model, compress_rate=50)  # the same options: idempotent
    assert not again.converted and again.already_converted == ["0", "2"]


def test_other_layers_may_be_band_limited_at_another_rate():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    band_limit(model, compress_rate=25, modules=["0"])
    report = band_limit(model, compress_rate=75, modules=["2"])
    assert [c.name for c in report.converted] == ["2"]
    assert (model[0].compress_rate, model[2].compress_rate) == (25, 75)


def test_monai_unet_3d_defaults_hold_no_more_than_the_baseline_or_warn_first():
    monai = pytest.importorskip("monai")
    torch.manual_seed(0)
    net = monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16, 32),
                                   strides=(2, 2, 2), num_res_units=2)
    x = torch.randn(1, 1, 16, 16, 16)
    base = _held(net, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = band_limit(net, example_input=x)
    est = report.extra["estimate"]
    assert len(report.converted) >= 10 and all(e.fft_shape != (32, 32, 32) for e in est.layers)
    banded = _held(net, x)
    assert banded - base == est.added_bytes  # the estimate is what the forward then holds
    warned = [w for w in caught if "estimate:" in str(w.message)]
    assert banded <= base or warned
    y = net(x)
    assert y.shape == (1, 2, 16, 16, 16)
