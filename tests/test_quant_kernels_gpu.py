"""The CUDA kernels of ``cuda/quant_pack.cu`` against the torch reference (needs a CUDA device).

Contract: ``pack(groups, bits, stochastic, seed) -> (codes, lo, step, exponent, finite)`` gives, for
deterministic rounding, the very bits of :func:`quantize_groups` (ordinary, zero-based and constant
groups, subnormal and huge values included), ``finite`` is 0 when any group holds NaN or Inf, and
``unpack`` gives the very bits of :func:`dequantize_groups`.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from lightning_memcomp import kernels
from lightning_memcomp.compression import compress_activations
from lightning_memcomp.compression.bitpack import unpack_bits
from lightning_memcomp.compression.quant import QuantCodec, QuantPayload, dequantize_groups, quantize_groups
from lightning_memcomp.memory.engine import SaveContext

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = [1, 2, 4, 8]
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.int8: torch.int8, torch.uint8: torch.uint8}


@pytest.fixture(scope="module")
def ext():
    return kernels.load_extension("quant_pack")


def _bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (so -0.0 differs from 0.0 and NaN patterns compare)."""
    return t.view(_INT_VIEW[t.dtype])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits_of(a), _bits_of(b))


def _smallest(dtype: torch.dtype) -> float:
    return float(torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)))


def _cases(dtype: torch.dtype, group_size: int = 256, device: str = "cuda", seed: int = 0) -> torch.Tensor:
    """Groups of every kind: ordinary, ReLU (zero-based), constant, tiny (subnormal) and huge values."""
    gen = torch.Generator().manual_seed(seed)
    S = group_size
    finfo = torch.finfo(dtype)
    sub = _smallest(dtype)

    def randn(rows: int) -> torch.Tensor:
        return torch.randn(rows, S, generator=gen)

    rows = [
        randn(40) * torch.rand(40, 1, generator=gen) * 10,  # ordinary, assorted scales
        randn(8) + 5.0,  # all positive, far from zero
        -(torch.rand(8, S, generator=gen) + 0.5),  # all negative
    ]
    relu = randn(24).relu()  # zero-based
    relu[:, 0] = 0.0
    relu[8:16] *= 1e-3
    rows.append(relu)
    one = torch.zeros(4, S)  # zero-based with a single positive value (step 0)
    one[:, 3] = torch.tensor([2.5, 1.0, 3.0e-3, 7.0])
    rows.append(one)
    close = randn(4).relu() * 1e-4 + 1.0  # zero-based, positives in a narrow band far from zero
    close[:, ::7] = 0.0
    rows.append(close)
    edge = randn(4).relu()  # zero-based whose smallest positive is far below its largest
    edge[:, 0] = 0.0
    edge[:, 1] = sub
    rows.append(edge)
    rows += [torch.full((3, S), 0.7), torch.full((3, S), -3.25), torch.zeros(2, S), torch.full((2, S), sub),
             torch.full((2, S), finfo.max), torch.full((2, S), -finfo.tiny)]  # constant groups
    for scale in (finfo.tiny * 100, finfo.tiny, sub * 30, sub * 4):  # tiny: around and below the smallest normal
        t = randn(6) * scale
        # no group of zeros of both signs (torch.aminmax picks either zero: see test_signed_zero_group)
        rows.append(torch.where(t.to(dtype) == 0, torch.full_like(t, sub), t))
    tiny_relu = (randn(4) * finfo.tiny * 50).relu()
    tiny_relu[:, 0] = 0.0
    tiny_relu[:, 1] = sub
    rows.append(tiny_relu)
    huge = randn(6) * finfo.max / 8  # huge: exponents at and beyond the int8 clamp
    huge[:3, 0] = finfo.max
    huge[3:, 0] = -finfo.max
    rows.append(huge)
    rows.append(torch.rand(4, S, generator=gen) * finfo.max)
    small_min = randn(4).abs() * 1e-3 + 1.0  # a positive minimum far below the maximum
    small_min[:, 0] = finfo.tiny
    rows.append(small_min)
    neg_max0 = -torch.rand(4, S, generator=gen)  # maximum exactly 0 (ordinary)
    neg_max0[:, 0] = 0.0
    rows.append(neg_max0)
    x = torch.cat(rows)
    x = x.clamp(-finfo.max, finfo.max).to(dtype)
    return x[torch.randperm(x.shape[0], generator=gen)].to(device)


def _zero_based(step: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    return torch.signbit(step) & (exponent != torch.iinfo(torch.int8).min)


def _assert_same_payload(got, ref, bits: int, mean_lo_ulps: int = 0) -> None:
    """Bit-identical codes/lo/step/exponent; ``mean_lo_ulps``: at 1 bit a zero-based group's ``lo`` is the
    mean positive value, whose float32 sum depends on the summation order (torch's vs the kernel's), so
    it may sit that many fp16 ulps away."""
    codes, lo, step, exponent = got[:4]
    assert _same_bits(codes, ref[0])
    assert _same_bits(step, ref[2])
    assert _same_bits(exponent, ref[3])
    if bits == 1 and mean_lo_ulps:
        mean_groups = _zero_based(ref[2], ref[3])
        assert _same_bits(lo[~mean_groups], ref[1][~mean_groups])
        ulps = (_bits_of(lo[mean_groups]).int() - _bits_of(ref[1][mean_groups]).int()).abs()
        assert ulps.numel() == 0 or int(ulps.max()) <= mean_lo_ulps
    else:
        assert _same_bits(lo, ref[1])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_pack_matches_torch_reference(ext, bits, dtype):
    groups = _cases(dtype)
    got = ext.pack(groups, bits, False, 0)
    assert len(got) == 5
    codes, lo, step, exponent, finite = got
    assert codes.shape == (groups.shape[0], groups.shape[1] * bits // 8) and codes.dtype == torch.uint8
    assert lo.dtype == step.dtype == torch.float16 and exponent.dtype == torch.int8
    assert finite.is_cuda and finite.numel() == 1 and bool(finite)
    ref = quantize_groups(groups, bits, stochastic=False)
    assert ref is not None
    _assert_same_payload(got, ref, bits, mean_lo_ulps=1)
    # every kind of group is there
    constant = exponent == torch.iinfo(torch.int8).min
    assert constant.any() and (torch.signbit(step) & ~constant).any() and (~torch.signbit(step) & ~constant).any()
    if dtype != torch.float16:  # float16 reaches neither end of the int8 exponent range
        assert (exponent == 127).any() and (exponent == -127).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_bit_mean_is_exact_when_the_sum_is(ext, dtype):
    # positives on a coarse grid: every float32 partial sum is exact, whatever the summation order
    gen = torch.Generator().manual_seed(1)
    groups = (torch.randint(0, 64, (64, 512), generator=gen) / 8).to(dtype).cuda()
    groups[:, 0] = 0
    got = ext.pack(groups, 1, False, 0)
    ref = quantize_groups(groups, 1, stochastic=False)
    _assert_same_payload(got, ref, 1)
    assert torch.signbit(got[2]).all()  # all zero-based


@pytest.mark.parametrize("group_size", [8, 40, 32, 96, 512, 4096, 65536])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_group_sizes(ext, group_size, bits):
    # group sizes that are not a multiple of the block, one warp or less, and the largest allowed
    rows = max(2, 8192 // group_size)
    gen = torch.Generator().manual_seed(group_size)
    groups = torch.randn(rows, group_size, generator=gen).cuda()
    groups[::2] = groups[::2].relu()
    got = ext.pack(groups, bits, False, 0)
    ref = quantize_groups(groups, bits, stochastic=False)
    _assert_same_payload(got, ref, bits, mean_lo_ulps=1)
    out = ext.unpack(*got[:4], bits, torch.float32)
    assert _same_bits(out, dequantize_groups(*got[:4], bits, torch.float32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_clears_the_finite_flag(ext, bad, dtype):
    groups = torch.randn(50, 256, device="cuda").to(dtype)
    ok = ext.pack(groups, 4, False, 0)[4]
    assert bool(ok) and int(ok) == 1
    groups[37, 101] = bad
    assert quantize_groups(groups, 4, stochastic=False) is None
    for bits in BITS:
        for stochastic in (False, True):
            finite = ext.pack(groups, bits, stochastic, 3)[4]
            assert finite.is_cuda and finite.numel() == 1
            assert not bool(finite) and int(finite) == 0


def test_non_finite_tensor_is_kept_as_it_is_by_the_codec():
    x = torch.randn(4, 64, 16, device="cuda", requires_grad=True)
    with torch.no_grad():
        x[1, 2, 3] = float("nan")
    kernels.set_backend("cuda")
    try:
        codec = QuantCodec(bits=4, group_size=64)
        payload = codec.encode(x, SaveContext("conv", nn.Conv2d(1, 1, 1)))
    finally:
        kernels.set_backend(None)
    assert payload is x


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unpack_matches_torch_reference(ext, bits, dtype):
    groups = _cases(dtype, seed=2)
    payload = quantize_groups(groups, bits, stochastic=False)
    got = ext.unpack(*payload, bits, dtype)
    ref = dequantize_groups(*payload, bits, dtype)
    assert got.dtype == dtype and _same_bits(got, ref)
    # the kernel's own payload decodes the same way
    packed = ext.pack(groups, bits, False, 0)
    assert _same_bits(ext.unpack(*packed[:4], bits, dtype), dequantize_groups(*packed[:4], bits, dtype))
    # finite; constants exact; in zero-based groups zeros stay zeros and positives stay positive
    assert torch.isfinite(got.float()).all()
    _, lo, step, exponent = payload
    constant = exponent == torch.iinfo(torch.int8).min
    zero_based = torch.signbit(step) & ~constant
    assert _same_bits(got[constant], groups[constant])
    assert torch.equal(got[zero_based] > 0, groups[zero_based] > 0)
    assert torch.equal(got[zero_based] == 0, groups[zero_based] == 0)
    # ordinary groups with a positive lo: positives stay positive
    positive_lo = ~constant & ~zero_based & (lo > 0)
    assert (got[positive_lo] > 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_signed_zero_group(ext, dtype):
    # a group of zeros of both signs is constant; which zero it keeps is not specified (torch.aminmax
    # keeps the first one it meets), but it decodes to zeros
    groups = torch.zeros(3, 64, device="cuda", dtype=dtype)
    groups[:, ::3] = -0.0
    codes, lo, step, exponent, finite = ext.pack(groups, 2, False, 0)
    assert bool(finite) and (exponent == torch.iinfo(torch.int8).min).all() and (codes == 0).all()
    out = ext.unpack(codes, lo, step, exponent, 2, dtype)
    assert (out == 0).all()


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_stochastic_pack_is_unbiased(ext, bits):
    gen = torch.Generator().manual_seed(3)
    groups = torch.randn(8, 256, generator=gen)
    groups[4:] = groups[4:].relu()  # zero-based groups too
    groups = groups.cuda()
    det = ext.pack(groups, bits, False, 0)
    ref = quantize_groups(groups, bits, stochastic=False)
    decoded, first = [], None
    for seed in range(400):
        codes, lo, step, exponent, finite = ext.pack(groups, bits, True, seed)
        assert bool(finite)
        # the metadata does not depend on the rounding; a code is the floor or the ceiling
        assert _same_bits(lo, det[1]) and _same_bits(step, det[2]) and _same_bits(exponent, det[3])
        diff = unpack_bits(codes, bits).int() - unpack_bits(ref[0], bits).int()
        assert diff.abs().max() <= 1
        first = codes if first is None else first
        decoded.append(ext.unpack(codes, lo, step, exponent, bits, torch.float32))
    assert not torch.equal(first, codes)  # the seed matters
    assert torch.equal(ext.pack(groups, bits, True, 7)[0], ext.pack(groups, bits, True, 7)[0])  # and repeats
    mean = torch.stack(decoded).mean(0)
    spacing = torch.ldexp(det[2].float().abs(), det[3].int()).unsqueeze(1).expand_as(mean)  # grid spacing
    # zero-based at 1 bit: a positive always decodes to the group's mean positive value (no rounding)
    rounded = ~(torch.signbit(det[2]) & torch.tensor(bits == 1, device="cuda")).unsqueeze(1).expand_as(mean)
    exact = ext.unpack(*det[:4], bits, torch.float32)
    assert torch.allclose(mean[~rounded], exact[~rounded], rtol=1e-5, atol=0)
    assert ((mean - groups).abs()[rounded] < spacing[rounded] / 4).all()
    # the torch path (torch.rand) is unbiased the same way
    torch_decoded = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(400):
        payload = quantize_groups(groups, bits, True, g)
        torch_decoded.append(dequantize_groups(*payload, bits, torch.float32))
    torch_mean = torch.stack(torch_decoded).mean(0)
    assert ((torch_mean - groups).abs()[rounded] < spacing[rounded] / 4).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_codec_kernel_and_torch_paths_agree(bits, dtype):
    x = (torch.randn(4, 8, 24, 24, device="cuda") * 3).to(dtype).requires_grad_()
    ctx = SaveContext("conv", nn.Conv2d(1, 1, 1))
    payloads = {}
    for backend in ("cuda", "torch"):
        kernels.set_backend(backend)
        try:
            codec = QuantCodec(bits=bits, group_size=128, stochastic=False)
            payloads[backend] = codec.encode(x, ctx)
            decoded = codec.decode(payloads[backend])
        finally:
            kernels.set_backend(None)
        assert decoded.dtype == dtype and decoded.shape == x.shape
    a, b = payloads["cuda"], payloads["torch"]
    assert isinstance(a, QuantPayload) and isinstance(b, QuantPayload)
    _assert_same_payload((a.codes, a.lo, a.step, a.exponent), (b.codes, b.lo, b.step, b.exponent), bits,
                         mean_lo_ulps=1)


def test_relu_mask_exact_with_kernels(ext):
    x = torch.relu(torch.randn(8, 16, 32, 32, device="cuda")).requires_grad_()
    for bits in BITS:
        kernels.set_backend("cuda")
        try:
            codec = QuantCodec(bits=bits)
            xhat = codec.decode(codec.encode(x, SaveContext("relu", nn.ReLU())))
        finally:
            kernels.set_backend(None)
        assert torch.equal(xhat > 0, x > 0)


@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_resnet_gradients_close_on_gpu(backend):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).cuda().train()
    x, y = torch.randn(16, 3, 64, 64, device="cuda"), torch.randint(0, 10, (16,), device="cuda")

    def grads(ctx):
        model.zero_grad(set_to_none=True)
        with ctx:
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).double()

    base = grads(contextlib.nullcontext())  # plain PyTorch, no hooks
    kernels.set_backend(backend)
    try:
        got = grads(compress_activations(model, bits=8))
    finally:
        kernels.set_backend(None)
    assert torch.nn.functional.cosine_similarity(got, base, dim=0) > 0.999


def test_channels_last_half_autocast_on_gpu():
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                          nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1)).cuda()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.float16):
        with compress_activations(model, bits=4) as ledger:
            out = model(x)
    out.float().square().mean().backward()
    assert ledger.ratio > 2.5
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
