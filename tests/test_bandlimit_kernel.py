"""The complex multiply-accumulate over channels: torch path on CPU, CUDA kernel against it (gpu-marked)."""

from __future__ import annotations

import itertools

import pytest
import torch

from lightning_memcomp import kernels
from lightning_memcomp.bandlimit import BandLimitedConv2d, BandLimitedConv3d, complex_mac


def _reference(a: torch.Tensor, b: torch.Tensor, conj_a: bool, conj_b: bool) -> torch.Tensor:
    a = a.conj() if conj_a else a
    b = b.conj() if conj_b else b
    return torch.einsum("kir,krj->kij", a.resolve_conj(), b.resolve_conj())


def _operands(k: int, i: int, r: int, j: int, dtype: torch.dtype, device: str = "cpu"):
    a = torch.randn(k, r, i, dtype=dtype, device=device).transpose(1, 2)  # a strided view, as in grad-weight
    b = torch.randn(k, j, r, dtype=dtype, device=device).transpose(1, 2)  # as the filter spectrum in forward
    return a, b


@pytest.mark.parametrize(("conj_a", "conj_b"), list(itertools.product([False, True], repeat=2)))
def test_torch_path_matches_einsum_for_every_conjugation(conj_a, conj_b):
    a, b = _operands(5, 3, 4, 6, torch.complex128)
    torch.testing.assert_close(complex_mac(a, b, conj_a, conj_b), _reference(a, b, conj_a, conj_b))


def test_kernel_source_ships_with_the_package():
    assert "complex_mac" in kernels.available_extensions()


@pytest.fixture
def cuda_backend():
    kernels.set_backend("cuda")
    yield kernels.load_extension("complex_mac")
    kernels.set_backend(None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize(("conj_a", "conj_b"), list(itertools.product([False, True], repeat=2)))
def test_cuda_kernel_matches_torch_path(cuda_backend, dtype, conj_a, conj_b):
    a, b = _operands(37, 19, 33, 21, dtype, "cuda")  # sizes that are not multiples of the 16-wide tile
    expected = _reference(a, b, conj_a, conj_b)
    actual = cuda_backend.complex_mac(a, b, conj_a, conj_b)
    tol = 1e-4 if dtype == torch.complex64 else 1e-10
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)
    assert actual.is_contiguous()


@pytest.mark.gpu
def test_cuda_kernel_covers_more_frequencies_than_one_grid_dimension(cuda_backend):
    a, b = _operands(70_000, 2, 3, 2, torch.complex64, "cuda")
    torch.testing.assert_close(cuda_backend.complex_mac(a, b, False, True), _reference(a, b, False, True),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cuda_kernel_reads_lazily_conjugated_views(cuda_backend):
    a, b = _operands(4, 5, 6, 7, torch.complex64, "cuda")
    torch.testing.assert_close(cuda_backend.complex_mac(a.conj(), b, False, False), _reference(a, b, True, False),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cuda_kernel_rejects_mismatched_shapes(cuda_backend):
    a = torch.randn(3, 4, 5, dtype=torch.complex64, device="cuda")
    with pytest.raises(RuntimeError, match="shapes do not match"):
        cuda_backend.complex_mac(a, a, False, False)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("layer_cls", "shape"), [(BandLimitedConv2d, (4, 6, 20, 17)), (BandLimitedConv3d, (2, 6, 6, 7, 5))]
)
@pytest.mark.parametrize("compress_rate", [0, 50])
def test_layer_with_cuda_kernel_matches_torch_path_forward_and_gradients(layer_cls, shape, compress_rate):
    layer = layer_cls(6, 5, 3, stride=2, padding=1, compress_rate=compress_rate).cuda()
    x = torch.randn(*shape, device="cuda")
    results = {}
    for backend in ("torch", "cuda"):
        kernels.set_backend(backend)
        try:
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            grads = torch.autograd.grad(y, [xi, layer.weight, layer.bias], torch.ones_like(y))
            results[backend] = [y.detach(), *grads]
        finally:
            kernels.set_backend(None)
    for actual, expected in zip(results["cuda"], results["torch"]):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_uncompressed_layer_on_cuda_matches_cudnn():
    conv = torch.nn.Conv2d(8, 16, 3, padding=1).cuda()
    layer = BandLimitedConv2d.from_conv(conv, compress_rate=0)
    x = torch.randn(4, 8, 32, 32, device="cuda")
    torch.backends.cudnn.allow_tf32 = False
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-4)
