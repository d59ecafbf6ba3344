"""The ``blpa`` codec: BLPA's per-channel bins aligned on the ReLU threshold (Chakrabarti & Moseley 2019)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from lightning_memcomp.compression import compress_activations
from lightning_memcomp.compression.blpa import BLPACodec, BLPAPayload, _relu_threshold, blpa_dequantize, blpa_quantize
from lightning_memcomp.memory.engine import SaveContext


def _roundtrip(codec: BLPACodec, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    x = x.detach().requires_grad_()
    ctx = SaveContext("m", module)
    assert codec.accepts(x, ctx)
    return codec.decode(codec.encode(x, ctx))


@pytest.mark.parametrize("bits", [0, 3, 16])
def test_bits_outside_allowed_values_raise(bits):
    with pytest.raises(ValueError, match=r"bits=.*use one of 1, 2, 4, 8"):
        BLPACodec(bits=bits)


@pytest.mark.parametrize("window", [0, -6.0, "6"])
def test_window_must_be_positive(window):
    with pytest.raises(ValueError, match="window"):
        BLPACodec(window=window)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_threshold_falls_on_a_bin_boundary(bits):
    x = torch.randn(8, 4, 8, 8) * 2 + 1
    t = torch.tensor([-0.5, 0.3, 1.0, 2.7])
    codes, thr, delta, shift = blpa_quantize(x, bits, t)
    above = x > t.view(1, -1, 1, 1)
    assert torch.equal(codes >= shift.view(1, -1, 1, 1), above)
    # decoded values stay on their side of the threshold
    xhat = blpa_dequantize(codes, thr, delta, shift, relu=False, dtype=torch.float32)
    assert torch.equal(xhat > t.view(1, -1, 1, 1), above)


def test_reconstruction_at_bin_centres_within_half_a_bin():
    x = torch.randn(16, 3, 8, 8)
    codes, thr, delta, shift = blpa_quantize(x, 8, None)
    xhat = blpa_dequantize(codes, thr, delta, shift, relu=False, dtype=torch.float32)
    inside = (x - x.mean((0, 2, 3), keepdim=True)).abs() < 2.9 * x.std((0, 2, 3), keepdim=True)
    err = (xhat - x).abs()
    assert torch.all(err[inside] <= (delta.view(1, -1, 1, 1) / 2).expand_as(x)[inside] * 1.001)


def test_window_is_six_standard_deviations():
    x = torch.randn(64, 2, 16, 16) * torch.tensor([1.0, 5.0]).view(1, 2, 1, 1)
    _, _, delta, _ = blpa_quantize(x, 4, None)
    sigma = x.transpose(0, 1).reshape(2, -1).std(1, correction=0)
    assert torch.allclose(delta, 6 * sigma / 16, rtol=1e-4)


def test_very_negative_beta_over_gamma_keeps_the_mask():
    """The original's pitfall: the shift leaves the window and every value decodes below the threshold."""
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.bias.fill_(-4.0)  # beta / gamma = -4: the ReLU threshold sits 4 sigma above the mean
    x = torch.randn(64, 2, 16, 16)
    t = _relu_threshold(x, bn)
    assert t is not None
    codes, thr, delta, shift = blpa_quantize(x, 4, t)
    assert int(shift.max()) <= 15
    above = x > t.view(1, -1, 1, 1)
    assert above.any()
    assert torch.equal(codes >= shift.view(1, -1, 1, 1), above)


def test_very_negative_beta_gradients_do_not_vanish():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[1].bias.fill_(-3.5)
    x = torch.randn(32, 3, 16, 16)
    model(x).sum().backward()
    base = model[0].weight.grad.clone()
    model.zero_grad()
    with compress_activations(model, codec="blpa", bits=4):
        out = model(x)
    out.sum().backward()
    got = model[0].weight.grad
    assert base.abs().sum() > 0 and got.abs().sum() > 0
    # measured 0.9976 at this seed (0.9926 the lowest over seeds 0-9): 0.99 leaves that spread as margin
    assert torch.nn.functional.cosine_similarity(got.flatten(), base.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_output_mask_exact(bits, dtype):
    x = torch.relu(torch.randn(4, 8, 16, 16)).to(dtype)
    xhat = _roundtrip(BLPACodec(bits=bits), x, nn.ReLU())
    assert xhat.dtype == dtype
    assert torch.equal(xhat > 0, x > 0)
    assert torch.all(xhat[x == 0] == 0)


def test_leaky_relu_sign_exact_without_extra_mask():
    x = torch.randn(4, 8, 16, 16)
    codec = BLPACodec(bits=2)
    payload = codec.encode(x.requires_grad_(), SaveContext("act", nn.LeakyReLU()))
    assert isinstance(payload, BLPAPayload) and payload.mask is None
    assert torch.equal(codec.decode(payload) > 0, x > 0)


def test_batchnorm_input_threshold_matches_the_following_relu():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.5, -1.0, 0.2]))
    x = torch.randn(16, 3, 8, 8) * 3 + 1
    t = _relu_threshold(x, bn)
    y = bn(x).detach()
    for c in range(3):
        side = x[:, c] > t[c] if bn.weight[c] > 0 else x[:, c] < t[c]
        decisive = (x[:, c] - t[c]).abs() > 1e-3  # away from float ties at the threshold itself
        assert torch.equal((y[:, c] > 0)[decisive], side[decisive])


def test_stored_bytes_about_32_over_bits():
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    codec = BLPACodec(bits=4)
    payload = codec.encode(x, SaveContext("conv", nn.Conv2d(16, 16, 1)))
    assert x.numel() * 4 / codec.stored_nbytes(payload) == pytest.approx(8, rel=0.01)


def test_channels_last_and_volumes_roundtrip():
    codec = BLPACodec(bits=8)
    for x in (torch.randn(2, 8, 8, 8).to(memory_format=torch.channels_last), torch.randn(2, 4, 6, 6, 6)):
        xhat = _roundtrip(codec, x, nn.Conv2d(1, 1, 1))
        assert xhat.shape == x.shape and xhat.stride() == x.stride()
        # the same numbers as for the contiguous tensor (bins are per channel, whatever the layout)
        assert torch.allclose(xhat, _roundtrip(codec, x.contiguous(), nn.Conv2d(1, 1, 1)))
        assert (xhat - x).abs().mean() < 0.02


def test_maxpool_indices_exact():
    _, idx = nn.functional.max_pool2d(torch.randn(2, 3, 16, 16), 2, return_indices=True)
    codec = BLPACodec(bits=2)
    ctx = SaveContext("pool", nn.MaxPool2d(2))
    assert torch.equal(codec.decode(codec.encode(idx, ctx)), idx)


def test_torchvision_resnet_gradients_close_at_eight_bits():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([1, 2, 3, 4])

    def grads(ctx):
        model.zero_grad(set_to_none=True)
        with ctx:
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).double()

    base = grads(contextlib.nullcontext())
    engine = compress_activations(model, codec="blpa", bits=8)
    got = grads(engine)
    assert engine.ledger.ratio > 3.5
    assert torch.nn.functional.cosine_similarity(got, base, dim=0) > 0.999


def test_channel_statistics_combined_over_chunks_equal_the_whole_tensor():
    from lightning_memcomp.compression.blpa import _channel_std_mean

    torch.manual_seed(0)
    for x in ((torch.randn(64, 4, 8, 8) * 3 + 100).half(), torch.randn(64, 4, 8, 8) * 1e-30):
        amax = x.abs().amax(dim=(0, 2, 3)).float()
        std, mean = _channel_std_mean(x, torch.float32, rows=7, amax=amax)  # 10 chunks, the last one short
        ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
        # float32 squares of 1e-30 would underflow: the per-channel power-of-two scale keeps them
        torch.testing.assert_close(std.double(), ref_var.sqrt(), rtol=1e-4, atol=0)
        torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-4, atol=1e-6 * float(amax.max()))
