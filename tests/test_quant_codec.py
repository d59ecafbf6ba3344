"""The ``quant`` codec: k-bit per-group quantization with exact gradient routing."""

from __future__ import annotations

import contextlib

import warnings

import pytest
import torch
from torch import nn

from lightning_memcomp.compression import compress_activations
from lightning_memcomp.compression.bitpack import (
    DropoutMask,
    NarrowIndices,
    pack_bits,
    pack_mask,
    unpack_bits,
    unpack_mask,
)
from lightning_memcomp.compression.quant import QuantCodec, QuantPayload
from lightning_memcomp.memory.engine import SaveContext

FLOAT_CTX = SaveContext("conv", nn.Conv2d(1, 1, 1))


def _roundtrip(codec: QuantCodec, x: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    ctx = SaveContext("m", module if module is not None else nn.Conv2d(1, 1, 1))
    if x.is_floating_point():
        x = x.detach().requires_grad_()  # an activation, not the network's input
    assert codec.accepts(x, ctx)
    return codec.decode(codec.encode(x, ctx))


def _grad_vector(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    with ctx:
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


# -- options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [0, 3, 16, 2.0, True, "4"])
def test_bits_outside_allowed_values_raise(bits):
    with pytest.raises(ValueError, match=r"bits=.*use one of 1, 2, 4, 8"):
        QuantCodec(bits=bits)


def test_unknown_codec_name_raises_with_allowed_names():
    with pytest.raises(ValueError, match="codec='quantize'.*quant"):
        compress_activations(nn.Conv2d(1, 1, 1), codec="quantize")


@pytest.mark.parametrize("group_size", [0, 48, 100, 131072])
def test_group_size_must_be_multiple_of_32(group_size):
    with pytest.raises(ValueError, match="group_size"):
        QuantCodec(group_size=group_size)


def test_selection_matching_nothing_warns():
    with pytest.warns(UserWarning, match="matched no module"):
        compress_activations(nn.Sequential(nn.Conv2d(1, 2, 3)), bits=4, modules="decoder.*")


def test_stochastic_rounding_defaults_on_up_to_two_bits():
    # nearest rounding at 4 and 8 bits: the closer gradient per step (benchmarks/results/zoo_coverage_cpu.md)
    assert [QuantCodec(bits=b).stochastic for b in (1, 2, 4, 8)] == [True, True, False, False]
    assert QuantCodec(bits=2, stochastic=False).stochastic is False


def test_options_reach_the_codec_through_compress_activations():
    engine = compress_activations(nn.Sequential(nn.Conv2d(1, 2, 3)), bits=2, group_size=512)
    codec = engine.codec_of("0")
    assert isinstance(codec, QuantCodec) and codec.bits == 2 and codec.group_size == 512


# -- bit packing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_bits_roundtrip_and_size(bits):
    codes = torch.randint(0, 1 << bits, (3, 64), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (3, 64 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits), codes)


def test_pack_mask_roundtrip_odd_length():
    mask = torch.rand(1001) > 0.5
    assert torch.equal(unpack_mask(pack_mask(mask), 1001), mask)


# -- quantization ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_deterministic_rounding_error_within_half_a_step(bits):
    x = torch.randn(4, 8, 16, 16)
    codec = QuantCodec(bits=bits, stochastic=False, group_size=256)
    xhat = _roundtrip(codec, x)
    groups = x.reshape(-1, 256)
    step = (groups.amax(1) - groups.amin(1)) / ((1 << bits) - 1)
    err = (xhat - x).reshape(-1, 256).abs().amax(1)
    assert torch.all(err <= step * 0.5 * 1.01 + 1e-6)


def test_stochastic_rounding_is_unbiased():
    x = torch.randn(1, 1, 32, 32)
    codec = QuantCodec(bits=2, seed=3)
    mean = torch.stack([_roundtrip(codec, x) for _ in range(400)]).mean(0)
    step = (x.max() - x.min()) / 3
    single_error = (_roundtrip(codec, x) - x).abs().mean()
    assert (mean - x).abs().mean() < single_error / 8
    assert (mean - x).abs().max() < step / 4


def test_stochastic_rounding_leaves_global_rng_untouched():
    x = torch.randn(2, 2, 16, 16, requires_grad=True)
    codec = QuantCodec(bits=2)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    codec.decode(codec.encode(x, FLOAT_CTX))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_relu_output_mask_is_exact_at_every_width(bits, dtype):
    x = torch.relu(torch.randn(4, 8, 16, 16) * 3).to(dtype)
    x[0, 0, 0, :4] = torch.tensor([1e-6, 1e-4, 1e-3, 0.0]).to(dtype)  # tiny positives next to big values
    xhat = _roundtrip(QuantCodec(bits=bits), x, nn.ReLU())
    assert xhat.dtype == dtype
    assert torch.equal(xhat > 0, x > 0)
    assert torch.all(xhat[x == 0] == 0)


def test_exact_zero_stays_exact_in_nonnegative_groups():
    x = torch.rand(2, 4, 16, 16)
    x[x < 0.3] = 0
    xhat = _roundtrip(QuantCodec(bits=4), x)
    assert torch.all(xhat[x == 0] == 0)


def test_constant_group_decodes_exactly():
    x = torch.full((1, 2, 16, 16), 0.75)
    assert torch.equal(_roundtrip(QuantCodec(bits=2), x), x)


def test_values_beyond_fp16_range_survive():
    x = torch.randn(1, 2, 16, 16) * 1e6
    xhat = _roundtrip(QuantCodec(bits=8), x)
    assert torch.isfinite(xhat).all()
    assert (xhat - x).abs().max() < (x.max() - x.min()) / 255


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_stored_bytes_shrink_with_bits(bits):
    x = torch.randn(8, 16, 32, 32)
    codec = QuantCodec(bits=bits)
    payload = codec.encode(x.requires_grad_(), FLOAT_CTX)
    raw = x.numel() * 4
    expected = x.numel() * bits / 8 + 5 * x.numel() / codec.group_size
    assert codec.stored_nbytes(payload) == pytest.approx(expected, rel=1e-6)
    assert raw / codec.stored_nbytes(payload) > 32 / bits * 0.85


def test_padding_of_partial_last_group():
    x = torch.randn(3, 5, 7, 11)  # 1155 elements, not a multiple of 256
    xhat = _roundtrip(QuantCodec(bits=8), x)
    assert xhat.shape == x.shape
    assert (xhat - x).abs().max() < 0.05


# -- layouts and dtypes ----------------------------------------------------------------------------
def test_channels_last_is_grouped_along_channels_and_kept():
    x = torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last)
    xhat = _roundtrip(QuantCodec(bits=8), x)
    assert xhat.is_contiguous(memory_format=torch.channels_last)
    assert (xhat - x).abs().max() < 0.05


def test_five_dimensional_volume_roundtrip():
    x = torch.randn(2, 4, 8, 8, 8).to(memory_format=torch.channels_last_3d)
    xhat = _roundtrip(QuantCodec(bits=8), x)
    assert xhat.shape == x.shape and xhat.is_contiguous(memory_format=torch.channels_last_3d)
    assert (xhat - x).abs().max() < 0.05


def test_non_dense_view_roundtrip():
    x = torch.randn(4, 8, 16, 32)[..., ::2]
    assert (_roundtrip(QuantCodec(bits=8), x) - x).abs().max() < 0.05


# -- exact routing ---------------------------------------------------------------------------------
def test_maxpool_indices_stored_narrow_and_exact():
    pool = nn.MaxPool2d(3, 2, 1)
    _, idx = nn.functional.max_pool2d(torch.randn(2, 3, 40, 40), 3, 2, 1, return_indices=True)
    codec = QuantCodec(bits=2)
    ctx = SaveContext("pool", pool)
    assert codec.accepts(idx, ctx)
    payload = codec.encode(idx, ctx)
    assert isinstance(payload, NarrowIndices) and payload.values.dtype == torch.int16
    decoded = codec.decode(payload)
    assert decoded.dtype == torch.int64 and torch.equal(decoded, idx)


def test_float_dropout_multiplier_stored_as_one_bit():
    noise = torch.bernoulli(torch.full((4, 64, 16), 0.7)) / 0.7
    codec = QuantCodec(bits=2)
    ctx = SaveContext("drop", nn.Dropout(0.3))
    payload = codec.encode(noise, ctx)
    assert isinstance(payload, DropoutMask)
    assert codec.stored_nbytes(payload) <= noise.numel() / 8 + 8
    assert torch.equal(codec.decode(payload), noise)


def test_bool_dropout_mask_roundtrip():
    mask = torch.rand(4, 100) > 0.5
    codec = QuantCodec(bits=4)
    ctx = SaveContext("drop", nn.Dropout(0.5))
    assert codec.accepts(mask, ctx)
    assert torch.equal(codec.decode(codec.encode(mask, ctx)), mask)


def test_dropout_gradients_exact_through_engine():
    model = nn.Sequential(nn.Linear(64, 256), nn.Dropout(0.5), nn.Linear(256, 10))
    x = torch.randn(32, 64)
    torch.manual_seed(1)
    with compress_activations(model, bits=8, modules=["Dropout"]):
        out = model(x)
    out.square().sum().backward()
    g = model[0].weight.grad.clone()
    model.zero_grad()
    torch.manual_seed(1)
    model(x).square().sum().backward()
    assert torch.equal(g, model[0].weight.grad)


def test_leaky_relu_sign_mask_exact():
    x = torch.randn(4, 8, 16, 16) * 0.01
    x[0, 0, 0, 0] = 5.0  # one large value makes the small ones fall into one bin
    xhat = _roundtrip(QuantCodec(bits=1), x, nn.LeakyReLU(0.1))
    assert torch.equal(xhat > 0, x > 0)


def test_relu6_pass_mask_exact():
    x = torch.randn(4, 8, 16, 16) * 4 + 3
    xhat = _roundtrip(QuantCodec(bits=1), x, nn.ReLU6())
    assert torch.equal((xhat > 0) & (xhat < 6), (x > 0) & (x < 6))


def test_normalization_statistics_are_not_taken():
    codec = QuantCodec(bits=2)
    ctx = SaveContext("bn", nn.BatchNorm2d(2048))
    assert not codec.accepts(torch.randn(2048), ctx)
    assert codec.accepts(torch.randn(2, 2048, 4, 4), ctx)


def test_input_data_stored_at_input_bits():
    x = torch.randn(4, 3, 32, 32)  # does not require grad: the network's input
    payload = QuantCodec(bits=2).encode(x, FLOAT_CTX)
    assert isinstance(payload, QuantPayload) and payload.bits == 8
    exact = QuantCodec(bits=2, input_bits=None).encode(x, FLOAT_CTX)
    assert exact is x


# -- models ----------------------------------------------------------------------------------------
def _small_resnet(seed: int = 0) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10).train()


def test_identity_codec_gives_bit_identical_gradients():
    model = _small_resnet()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    base = _grad_vector(model, x, y, contextlib.nullcontext())
    ident = _grad_vector(model, x, y, compress_activations(model, codec="identity"))
    assert torch.equal(base, ident)


@pytest.mark.parametrize(("bits", "min_cosine"), [(8, 0.999), (4, 0.98)])
def test_torchvision_resnet_with_inplace_relu_gradients_close(bits, min_cosine):
    model = _small_resnet()
    assert model.relu.inplace
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([1, 7, 3, 0])
    base = _grad_vector(model, x, y, contextlib.nullcontext())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = compress_activations(model, bits=bits)
    got = _grad_vector(model, x, y, engine)
    assert engine.ledger.ratio > 32 / bits * 0.75
    assert torch.nn.functional.cosine_similarity(got, base, dim=0) > min_cosine


def test_bf16_autocast_on_cpu_trains():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16 * 16, 10))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = _grad_vector(model, x, y, contextlib.nullcontext())
        engine = compress_activations(model, bits=8)
        got = _grad_vector(model, x, y, engine)
    assert engine.ledger.by_codec()["quant"].stored_bytes < engine.ledger.by_codec()["quant"].raw_bytes / 1.8
    assert torch.nn.functional.cosine_similarity(got, base, dim=0) > 0.99


def test_conv3d_volume_network_gradients_close():
    model = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.InstanceNorm3d(8, affine=True), nn.PReLU(),
                          nn.Conv3d(8, 2, 1))
    x, y = torch.randn(2, 1, 16, 16, 16), torch.randint(0, 2, (2, 16, 16, 16))
    base = _grad_vector(model, x, y, contextlib.nullcontext())
    engine = compress_activations(model, bits=8)
    got = _grad_vector(model, x, y, engine)
    assert engine.ledger.by_codec()["quant"].ratio > 3  # the loss (outside the layers) stays as it is
    assert torch.nn.functional.cosine_similarity(got, base, dim=0) > 0.999


@pytest.mark.slow
def test_digits_accuracy_within_one_point_at_four_bits(small_cnn, train_digits):
    # One run's test accuracy moves by about two points with the random stream alone (measured: the
    # same 4-bit run passed on 3 of 5 rounding streams, the uncompressed one varies as much with the
    # initialisation), so the claim is about the mean over three seeds, each pair from one init.
    base, got = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        base_model = small_cnn()
        state = {k: v.clone() for k, v in base_model.state_dict().items()}
        base.append(train_digits(base_model, epochs=3, seed=seed))
        model = small_cnn()
        model.load_state_dict(state)
        got.append(train_digits(model, epochs=3, seed=seed,
                                context=lambda: compress_activations(model, bits=4)))
    mean_base, mean_got = sum(base) / 3, sum(got) / 3
    print(f"digits test accuracy over 3 seeds: uncompressed {base} mean {mean_base:.4f}, "
          f"quant 4-bit {got} mean {mean_got:.4f}")
    assert mean_got >= mean_base - 0.01
