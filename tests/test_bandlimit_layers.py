"""Band-limited FFT convolution layers (Dziedzic et al., ICML 2019): exactness, band-limiting, energy mode."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_memcomp import track_saved_tensors
from lightning_memcomp.bandlimit import (
    BandLimitedConv1d,
    BandLimitedConv2d,
    BandLimitedConv3d,
    UnsupportedConvError,
    band_limit,
    share_energy_levels,
)
from lightning_memcomp.bandlimit.functional import (
    band_limited_conv,
    choose_energy_level,
    energy_levels,
    sizes_for_level,
)

LAYER = {1: BandLimitedConv1d, 2: BandLimitedConv2d, 3: BandLimitedConv3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _forward_and_grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_(True)
    y = layer(x)
    grads = torch.autograd.grad(y, [x, layer.weight, layer.bias], g)
    return [y.detach(), *grads]


def _paper_fft_size(n: int, p: int, k: int) -> int:
    length = n + 2 * p + max(n + 2 * p - k + 1, k) - 1
    return 2 ** math.ceil(math.log2(length))


def _paper_mask(fft_h: int, fft_w: int, compress_rate: float) -> torch.Tensor:
    """The kept block of ALGORITHMS.md: rows 0..m-1 and the last m-1 rows, columns 0..m-1."""
    m = int((fft_h // 2 + 1) * math.sqrt((100 - compress_rate) / 100))
    mask = torch.zeros(fft_h, fft_w // 2 + 1, dtype=torch.bool)
    mask[:m, :m] = True
    if m > 1:
        mask[fft_h - (m - 1):, :m] = True
    return mask


# -- compress_rate = 0: an exact convolution ------------------------------------------------------------


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dims", [1, 2])
def test_uncompressed_layer_matches_nn_conv_forward_and_gradients(dims, stride, padding, kernel, size):
    conv = CONV[dims](3, 4, kernel, stride=stride, padding=padding)
    layer = LAYER[dims].from_conv(conv, compress_rate=0)
    x = torch.randn(2, 3, *([size] * dims))
    g = torch.randn_like(conv(x))
    expected = _forward_and_grads(conv, x, g)
    actual = _forward_and_grads(layer, x, g)
    for name, a, e in zip(["output", "grad_input", "grad_weight", "grad_bias"], actual, expected):
        assert a.shape == e.shape, name
        assert _rel(a, e) < 1e-4, name


@pytest.mark.parametrize("fft_size", ["power2", "linear", "minimal"])
def test_every_fft_size_is_exact_when_uncompressed(fft_size):
    conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2))
    layer = BandLimitedConv2d.from_conv(conv, compress_rate=0, fft_size=fft_size)
    x = torch.randn(2, 3, 9, 6)
    g = torch.randn_like(conv(x))
    for a, e in zip(_forward_and_grads(layer, x, g), _forward_and_grads(conv, x, g)):
        assert _rel(a, e) < 1e-4


def test_uncompressed_conv3d_matches_nn_conv3d():
    conv = nn.Conv3d(2, 3, 3, stride=(1, 2, 1), padding=1)
    layer = BandLimitedConv3d.from_conv(conv, compress_rate=0)
    x = torch.randn(2, 2, 5, 6, 4)
    g = torch.randn_like(conv(x))
    for a, e in zip(_forward_and_grads(layer, x, g), _forward_and_grads(conv, x, g)):
        assert _rel(a, e) < 1e-4


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("kernel", [3, 4])
def test_string_padding_matches_nn_conv(padding, kernel):
    conv = nn.Conv2d(2, 3, kernel, padding=padding)
    layer = BandLimitedConv2d.from_conv(conv, compress_rate=0)
    x = torch.randn(2, 2, 7, 8)
    g = torch.randn_like(conv(x))
    for a, e in zip(_forward_and_grads(layer, x, g), _forward_and_grads(conv, x, g)):
        assert a.shape == e.shape
        assert _rel(a, e) < 1e-4


def test_layer_without_bias_matches_nn_conv():
    conv = nn.Conv1d(3, 2, 3, padding=1, bias=False)
    layer = BandLimitedConv1d.from_conv(conv, compress_rate=0)
    x = torch.randn(2, 3, 10)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compress_rate", [0, 50])
@pytest.mark.parametrize("dims", [1, 2])
def test_gradcheck_in_float64(dims, compress_rate):
    layer = LAYER[dims](2, 2, 3, stride=2, padding=1, compress_rate=compress_rate).double()
    x = torch.randn(1, 2, *([6, 5][:dims]), dtype=torch.float64, requires_grad=True)
    plan = layer.plan(x.shape[2:])

    def fn(x, w, b):
        return band_limited_conv(x, w, b, plan, plan.block)

    assert torch.autograd.gradcheck(fn, (x, layer.weight, layer.bias), fast_mode=True)


# -- compress_rate > 0: the paper's low-pass block ---------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("compress_rate", [25, 50, 75])
def test_compressed_output_equals_explicit_masked_fft_reference(compress_rate, stride):
    n, k, p = 8, 3, 1
    layer = BandLimitedConv2d(3, 4, k, stride=stride, padding=p, compress_rate=compress_rate, fft_size="power2")
    x = torch.randn(2, 3, n, n)
    fft = _paper_fft_size(n, p, k)
    xp = F.pad(x, (p, p, p, p))
    spectrum = torch.einsum(
        "bchw,ochw->bohw", torch.fft.rfft2(xp, s=(fft, fft)), torch.fft.rfft2(layer.weight, s=(fft, fft)).conj()
    )
    spectrum = spectrum * _paper_mask(fft, fft, compress_rate)
    out_full = n + 2 * p - k + 1
    reference = torch.fft.irfft2(spectrum, s=(fft, fft))[..., :out_full:stride, :out_full:stride]
    reference = reference + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x).detach(), reference.detach(), rtol=1e-4, atol=1e-5)


def test_compressed_1d_output_discards_the_top_frequencies():
    n, k, p, rate = 16, 3, 1, 40
    layer = BandLimitedConv1d(2, 3, k, padding=p, compress_rate=rate, fft_size="power2")
    x = torch.randn(2, 2, n)
    fft = _paper_fft_size(n, p, k)
    half = fft // 2 + 1
    m = int(half * (100 - rate) / 100)
    spectrum = torch.einsum(
        "bcf,ocf->bof", torch.fft.rfft(F.pad(x, (p, p)), n=fft), torch.fft.rfft(layer.weight, n=fft).conj()
    )
    spectrum[..., m:] = 0
    reference = torch.fft.irfft(spectrum, n=fft)[..., : n + 2 * p - k + 1] + layer.bias.view(1, -1, 1)
    torch.testing.assert_close(layer(x).detach(), reference.detach(), rtol=1e-4, atol=1e-5)
    assert layer.realized_compression == pytest.approx(1 - m / half)


@pytest.mark.parametrize("compress_rate", [25, 50, 75])
def test_realized_compression_at_32x32_is_within_3_points_of_the_request(compress_rate):
    layer = BandLimitedConv2d(1, 1, 3, padding=1, compress_rate=compress_rate, fft_size="power2")
    layer(torch.randn(1, 1, 32, 32))
    fft = _paper_fft_size(32, 1, 3)
    dropped = 1 - _paper_mask(fft, fft, compress_rate).float().mean().item()
    assert layer.realized_compression == pytest.approx(dropped)
    assert abs(100 * layer.realized_compression - compress_rate) <= 3


def test_realized_compression_grows_with_compress_rate():
    layers = [BandLimitedConv2d(1, 1, 3, padding=1, compress_rate=r) for r in (0, 30, 60, 90)]
    layer_rates = [layer.compression_for((20, 20)) for layer in layers]
    assert layer_rates[0] == 0.0
    assert layer_rates == sorted(layer_rates) and len(set(layer_rates)) == 4


def test_only_the_compressed_input_spectrum_is_held_for_backward():
    b, c, o, n, rate = 4, 3, 5, 16, 75
    layer = BandLimitedConv2d(c, o, 3, padding=1, compress_rate=rate, fft_size="power2")
    x = torch.randn(b, c, n, n, requires_grad=True)
    fft = _paper_fft_size(n, 1, 3)
    kept = int(_paper_mask(fft, fft, rate).sum())
    with track_saved_tensors(layer) as ledger:
        layer(x).sum().backward()
    assert ledger.raw_bytes == kept * b * c * 8  # complex64; the weight is a parameter, never counted


def test_nothing_is_held_for_backward_when_the_weight_is_frozen():
    layer = BandLimitedConv2d(3, 5, 3, padding=1, compress_rate=50)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    with track_saved_tensors(layer) as ledger:
        layer(x).sum().backward()
    assert ledger.raw_bytes == 0
    assert x.grad is not None


# -- preserve_energy ---------------------------------------------------------------------------------------


def _block_energy_share(x: torch.Tensor, shape: tuple[int, int], sizes: tuple[int, int]) -> float:
    """Share of the two-sided spectrum's energy with |frequency| < m in every dim (computed independently)."""
    power = torch.fft.fftn(x.double(), s=shape, dim=(-2, -1)).abs().square().sum((0, 1))
    keep = torch.ones(shape, dtype=torch.bool)
    for axis, (n, m) in enumerate(zip(shape, sizes)):
        freq = torch.arange(n)
        inside = torch.minimum(freq, n - freq) < m
        keep &= inside.view(-1, 1) if axis == 0 else inside.view(1, -1)
    return (power[keep].sum() / power.sum()).item()


@pytest.mark.parametrize("preserve_energy", [50, 90, 99])
def test_energy_level_is_the_smallest_block_holding_the_requested_share(preserve_energy):
    x = torch.randn(3, 2, 12, 12).cumsum(-1).cumsum(-2)  # a low-frequency-heavy signal
    shape = (16, 16)
    levels, weights, top = energy_levels(shape)
    level = choose_energy_level(torch.fft.rfftn(x, s=shape), levels, weights, top, preserve_energy)
    assert _block_energy_share(x, shape, sizes_for_level(shape, level)) >= preserve_energy / 100 - 1e-9
    if level > 1:
        assert _block_energy_share(x, shape, sizes_for_level(shape, level - 1)) < preserve_energy / 100


def _energy_net(preserve_energy: float = 90) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1),
    )
    band_limit(model, preserve_energy=preserve_energy, modules=lambda m, n: isinstance(m, nn.Conv2d))
    return model


def _smooth(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).cumsum(-1).cumsum(-2)


@pytest.fixture
def count_host_reads(monkeypatch):
    """Counts the energy mode's host reads; any other device-to-host read fails the test."""
    from lightning_memcomp.bandlimit import layers as layers_module

    reads: list[int] = []
    allowed = [False]
    original = layers_module.read_levels

    def counting_read(levels):
        reads.append(levels.numel())
        allowed[0] = True
        try:
            return original(levels)
        finally:
            allowed[0] = False

    monkeypatch.setattr(layers_module, "read_levels", counting_read)
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)

        def guarded(self, *args, _real=real, _name=name):
            if not allowed[0]:
                pytest.fail(f"Tensor.{_name} read a tensor on the host outside read_levels")
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, name, guarded)
    return reads


def test_energy_mode_reads_every_layer_with_one_host_sync_per_batch(count_host_reads):
    model = _energy_net()
    assert len({id(m.energy_levels) for m in model if isinstance(m, BandLimitedConv2d)}) == 1
    per_batch = []
    for step in range(5):
        before = len(count_host_reads)
        x = _smooth(2, 2, 12, 12) if step % 2 else torch.randn(2, 2, 12, 12)
        model(x).square().sum().backward()
        per_batch.append(count_host_reads[before:])
    # batch 0 calibrates each layer at once (one read per layer); batch 1 applies those levels and measures
    # its own; from batch 2 on, the first layer reads every layer's level of the previous batch at once
    assert per_batch == [[1, 1, 1], [], [3], [3], [3]]


def test_sharing_energy_levels_after_some_batches_keeps_one_read_per_batch(count_host_reads):
    first = BandLimitedConv2d(1, 2, 3, padding=1, preserve_energy=90)
    second = BandLimitedConv2d(2, 1, 3, padding=1, preserve_energy=90)
    model = nn.Sequential(first, second)
    for _ in range(3):  # separate groups: one read per layer per batch
        model(torch.randn(2, 1, 10, 10))
    assert count_host_reads == [1, 1, 1, 1]  # two calibrations, then one flush per layer
    shared = share_energy_levels(model)
    assert first.energy_levels is shared and second.energy_levels is shared
    del count_host_reads[:]
    for _ in range(3):
        model(torch.randn(2, 1, 10, 10))
    assert count_host_reads == [2, 2]  # the batch after sharing has nothing pending to read


def test_energy_mode_applies_each_batch_level_from_the_next_batch():
    layer = BandLimitedConv2d(1, 1, 3, padding=1, preserve_energy=90)
    noise, smooth = torch.randn(2, 1, 16, 16), _smooth(2, 1, 16, 16)
    layer(noise)  # calibrates on noise
    noisy = layer.realized_compression
    layer(smooth)  # still the noise level; the smooth one is measured
    assert layer.realized_compression == noisy
    layer(smooth)
    assert layer.realized_compression > noisy  # a smooth input keeps fewer frequencies
    layer(noise)
    assert layer.realized_compression > noisy
    layer(noise)
    assert layer.realized_compression == noisy


def test_energy_mode_drops_more_of_a_smooth_input_than_of_noise():
    noise = torch.randn(2, 1, 16, 16)
    noisy = BandLimitedConv2d(1, 1, 3, padding=1, preserve_energy=90)
    noisy(noise)
    smooth = BandLimitedConv2d(1, 1, 3, padding=1, preserve_energy=90)
    smooth(noise.cumsum(-1).cumsum(-2))
    assert smooth.realized_compression > noisy.realized_compression


def test_energy_mode_under_activation_checkpointing_matches_the_plain_run():
    from torch.utils.checkpoint import checkpoint

    plain, checkpointed = _energy_net(), _energy_net()
    for step in range(4):
        x = _smooth(2, 2, 12, 12) if step % 2 else torch.randn(2, 2, 12, 12)
        plain.zero_grad()
        checkpointed.zero_grad()
        plain(x).square().sum().backward()
        checkpoint(checkpointed, x, use_reentrant=False).square().sum().backward()
        for a, b in zip(plain.parameters(), checkpointed.parameters()):
            torch.testing.assert_close(a.grad, b.grad)
        compression = [[m.realized_compression for m in net if isinstance(m, BandLimitedConv2d)]
                       for net in (plain, checkpointed)]
        assert compression[0] == compression[1]


def test_energy_levels_survive_deepcopy_and_pickle_without_pending_reads():
    import pickle

    model = _energy_net()
    for _ in range(2):
        model(torch.randn(1, 2, 8, 8))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        layers = [m for m in clone if isinstance(m, BandLimitedConv2d)]
        assert len({id(m.energy_levels) for m in layers}) == 1
        assert layers[0].energy_levels.reads == 0
        clone(torch.randn(1, 2, 8, 8)).sum().backward()
        assert all(m.realized_compression is not None for m in layers)


@pytest.mark.gpu
def test_energy_mode_syncs_the_device_once_per_batch_on_cuda():
    import warnings

    model = _energy_net().cuda()
    syncs = []
    for step in range(4):
        x = (_smooth(2, 2, 12, 12) if step % 2 else torch.randn(2, 2, 12, 12)).cuda()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(x).square().sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
    assert syncs[2:] == [1, 1]  # steady state: the one read of every layer's level per batch


def test_energy_mode_at_100_percent_matches_nn_conv():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    layer = BandLimitedConv2d.from_conv(conv, preserve_energy=100)
    x = torch.randn(2, 2, 9, 9)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-5)
    assert layer.realized_compression == 0.0


def test_energy_mode_gradients_equal_the_fixed_block_gradients():
    layer = BandLimitedConv2d(2, 3, 3, padding=1, preserve_energy=80).double()
    x = torch.randn(2, 2, 9, 9, dtype=torch.float64).cumsum(-1)
    plan = layer.plan(x.shape[2:])
    levels, weights, top = plan.energy
    level = choose_energy_level(torch.fft.rfftn(x, s=plan.fft_shape), levels, weights, top, 80)
    block = plan.block_for_level(level)
    g = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    actual = _forward_and_grads(layer, x, g)
    fixed = lambda inp: band_limited_conv(inp, layer.weight, layer.bias, plan, block)  # noqa: E731
    fixed.weight, fixed.bias = layer.weight, layer.bias  # type: ignore[attr-defined]
    expected = _forward_and_grads(fixed, x, g)  # type: ignore[arg-type]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


# -- construction, options and errors ----------------------------------------------------------------------


def test_from_conv_shares_the_original_weight_and_bias():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = BandLimitedConv2d.from_conv(conv, compress_rate=50)
    assert layer.weight is conv.weight and layer.bias is conv.bias
    assert set(layer.state_dict()) == set(conv.state_dict())


def test_neither_mode_given_means_compress_rate_50():
    layer = BandLimitedConv2d(1, 1, 3)
    assert layer.compress_rate == 50 and layer.preserve_energy is None


@pytest.mark.parametrize("rate", [-1, 100, 150, True])
def test_compress_rate_outside_0_100_is_refused(rate):
    with pytest.raises(ValueError, match=r"compress_rate=.*\[0, 100\)"):
        BandLimitedConv2d(1, 1, 3, compress_rate=rate)


@pytest.mark.parametrize("energy", [0, -5, 100.5])
def test_preserve_energy_outside_0_100_is_refused(energy):
    with pytest.raises(ValueError, match=r"preserve_energy=.*\(0, 100\]"):
        BandLimitedConv2d(1, 1, 3, preserve_energy=energy)


def test_both_modes_at_once_are_refused():
    with pytest.raises(ValueError, match="both given"):
        BandLimitedConv2d(1, 1, 3, compress_rate=50, preserve_energy=90)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"groups": 2}, "groups=2"),
        ({"dilation": 2}, r"dilation=\(2, 2\)"),
        ({"padding_mode": "reflect"}, "padding_mode='reflect'"),
    ],
)
def test_unsupported_conv_options_are_refused_by_name(kwargs, option):
    with pytest.raises(UnsupportedConvError, match=option):
        BandLimitedConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, **kwargs))


def test_unknown_fft_size_is_refused():
    with pytest.raises(ValueError, match="fft_size='huge'"):
        BandLimitedConv2d(1, 1, 3, fft_size="huge")


def test_from_conv_refuses_a_conv_of_the_wrong_dimension():
    with pytest.raises(TypeError, match="Conv2d"):
        BandLimitedConv2d.from_conv(nn.Conv1d(1, 1, 3))


def test_bfloat16_input_returns_bfloat16_close_to_float32():
    layer = BandLimitedConv2d(2, 3, 3, padding=1, compress_rate=0)
    x = torch.randn(2, 2, 8, 8)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)


def test_deepcopy_after_forward_gives_an_equal_layer():
    layer = BandLimitedConv2d(2, 3, 3, padding=1, compress_rate=50)
    x = torch.randn(1, 2, 8, 8)
    y = layer(x)
    clone = copy.deepcopy(layer)
    torch.testing.assert_close(clone(x), y)
