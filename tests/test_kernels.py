"""The CUDA extension loader: sources found, backend switch, torch fallback on CPU tensors."""

from __future__ import annotations

import pytest
import torch

from lightning_memcomp import kernels


def test_every_cuda_source_is_found_with_the_package() -> None:
    names = kernels.available_extensions()
    assert {"quant_pack", "complex_mac"} <= set(names)
    for name in names:
        assert (kernels._sources_dir() / f"{name}.cu").read_text().count("PYBIND11_MODULE") == 1


def test_cpu_tensors_always_take_the_torch_path(monkeypatch) -> None:
    monkeypatch.setenv("MEMCOMP_KERNELS", "cuda")
    assert kernels.use_cuda_kernel("quant_pack", torch.zeros(2)) is None


def test_bad_backend_is_named(monkeypatch) -> None:
    monkeypatch.setenv("MEMCOMP_KERNELS", "triton")
    with pytest.raises(ValueError, match="MEMCOMP_KERNELS='triton'.*auto, cuda, torch"):
        kernels.backend()
    with pytest.raises(ValueError, match="kernel backend 'fast'"):
        kernels.set_backend("fast")


def test_unknown_extension_is_refused() -> None:
    with pytest.raises(FileNotFoundError, match="no CUDA source for extension 'nope'"):
        kernels.load_extension("nope")
