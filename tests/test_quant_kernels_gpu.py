"""The CUDA kernels of ``cuda/quant_pack.cu`` against the torch reference (needs a CUDA device)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_memcomp import kernels
from lightning_memcomp.compression import compress_activations
from lightning_memcomp.compression.quant import QuantCodec, dequantize_groups, quantize_groups
from lightning_memcomp.memory.engine import SaveContext

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ext():
    return kernels.load_extension("quant_pack")


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_deterministic_pack_matches_torch_reference(ext, bits, dtype):
    groups = (torch.randn(300, 256, device="cuda") * torch.rand(300, 1, device="cuda") * 10).to(dtype)
    groups[:20] = groups[:20].relu()
    codes, lo, step, exponent = ext.pack(groups, bits, False, 0)
    ref = quantize_groups(groups, bits, stochastic=False)
    assert torch.equal(lo, ref[1]) and torch.equal(step, ref[2]) and torch.equal(exponent, ref[3])
    # codes may differ only where a value sits on a rounding tie (float division order)
    diff = (codes != ref[0]).float().mean()
    assert diff < 1e-3


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unpack_matches_torch_reference(ext, bits, dtype):
    groups = torch.randn(64, 512, device="cuda").to(dtype)
    codes, lo, step, exponent = quantize_groups(groups, bits, stochastic=False)
    got = ext.unpack(codes, lo, step, exponent, bits, dtype)
    ref = dequantize_groups(codes, lo, step, exponent, bits, dtype)
    assert got.dtype == dtype and torch.equal(got, ref)


def test_stochastic_pack_is_unbiased(ext):
    groups = torch.randn(4, 256, device="cuda")
    decoded = []
    for seed in range(300):
        codes, lo, step, exponent = ext.pack(groups, 2, True, seed)
        decoded.append(ext.unpack(codes, lo, step, exponent, 2, torch.float32))
    mean = torch.stack(decoded).mean(0)
    step = (groups.amax(1, keepdim=True) - groups.amin(1, keepdim=True)) / 3
    assert ((mean - groups).abs() < step / 4).all()


def test_relu_mask_exact_with_kernels(ext):
    x = torch.relu(torch.randn(8, 16, 32, 32, device="cuda")).requires_grad_()
    kernels.set_backend("cuda")
    try:
        codec = QuantCodec(bits=1)
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

    base = grads(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
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
