"""The kernel loader: sources found, backend switch, which path each device takes, torch fallbacks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_memcomp import kernels


def test_every_kernel_source_is_found_with_the_package() -> None:
    assert {"quant_pack", "complex_mac"} <= set(kernels.cuda_extensions())
    assert "codecs_cpu" in kernels.cpu_extensions()
    assert set(kernels.available_extensions()) == set(kernels.cuda_extensions()) | set(kernels.cpu_extensions())
    for name in kernels.cuda_extensions():
        assert (kernels._sources_dir() / f"{name}.cu").read_text().count("PYBIND11_MODULE") == 1
    for name in kernels.cpu_extensions():
        assert (kernels._sources_dir() / f"{name}.cpp").read_text().count("PYBIND11_MODULE") == 1


def test_cpu_tensors_never_take_the_cuda_extension(monkeypatch) -> None:
    for mode in kernels.BACKENDS:
        monkeypatch.setenv("MEMCOMP_KERNELS", mode)
        assert kernels.use_cuda_kernel("quant_pack", torch.zeros(2)) is None
        assert kernels.use_triton_kernel("quant", torch.zeros(2)) is None


@pytest.mark.parametrize("mode", ["cuda", "triton", "torch"])
def test_cpu_kernel_only_in_auto_and_cpp_modes(monkeypatch, mode) -> None:
    monkeypatch.setenv("MEMCOMP_KERNELS", mode)
    assert kernels.use_cpu_kernel("codecs_cpu", torch.zeros(2)) is None
    monkeypatch.setenv("MEMCOMP_KERNELS", "cpp")
    assert kernels.use_cpu_kernel("codecs_cpu", torch.zeros(2, device="meta")) is None  # not a CPU tensor


def test_triton_hook_imports_lazily_and_tolerates_a_missing_module_in_auto(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "_failed", set())
    cuda_like = SimpleNamespace(is_cuda=True)
    monkeypatch.setenv("MEMCOMP_KERNELS", "auto")
    assert kernels.use_triton_kernel("no_such_module", cuda_like) is None
    assert kernels.use_triton_kernel("bitpack", cuda_like).__name__ == "lightning_memcomp.compression.bitpack"
    monkeypatch.setenv("MEMCOMP_KERNELS", "triton")
    with pytest.raises(ImportError):
        kernels.use_triton_kernel("no_such_module", cuda_like)
    for mode in ("cuda", "cpp", "torch"):
        monkeypatch.setenv("MEMCOMP_KERNELS", mode)
        assert kernels.use_triton_kernel("bitpack", cuda_like) is None


def test_triton_that_cannot_run_is_skipped_in_auto_and_an_error_when_forced(monkeypatch) -> None:
    from lightning_memcomp.compression import quant_triton

    monkeypatch.setattr(kernels, "_failed", set())
    monkeypatch.setattr(quant_triton, "available", lambda: False)
    cuda_like = SimpleNamespace(is_cuda=True)
    monkeypatch.setenv("MEMCOMP_KERNELS", "auto")
    assert kernels.use_triton_kernel("quant_triton", cuda_like) is None
    monkeypatch.setenv("MEMCOMP_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="MEMCOMP_KERNELS=triton: the Triton kernels of 'quant_triton' cannot run"):
        kernels.use_triton_kernel("quant_triton", cuda_like)


def test_quant_on_cuda_tries_triton_then_the_cuda_extension(monkeypatch) -> None:
    """A Triton kernel that fails (e.g. to compile) warns once and hands over to the CUDA extension, for
    good; forced with MEMCOMP_KERNELS=triton the failure is raised."""
    from lightning_memcomp.compression import quant

    monkeypatch.setattr(kernels, "_failed", set())
    calls = []

    def broken(*args):
        calls.append("triton")
        raise RuntimeError("PTX JIT compilation failed\nmore lines")

    fake_triton = SimpleNamespace(pack=broken, available=lambda: True)
    fake_ext = SimpleNamespace(pack=lambda *args: calls.append("cuda") or "packed by the extension")
    monkeypatch.setattr(quant, "use_triton_kernel",
                        lambda name, t: None if f"triton:{name}" in kernels._failed else fake_triton)
    monkeypatch.setattr(quant, "use_cuda_kernel", lambda name, t: fake_ext)
    monkeypatch.setenv("MEMCOMP_KERNELS", "auto")
    x = torch.zeros(4)
    with pytest.warns(UserWarning, match="Triton kernel 'quant_triton' failed \\(RuntimeError: PTX JIT compilation "
                                         "failed\\); using the next variant"):
        assert quant._cuda_call(x, "pack", x) == "packed by the extension"
    assert quant._cuda_call(x, "pack", x) == "packed by the extension"
    assert calls == ["triton", "cuda", "cuda"]
    monkeypatch.setattr(kernels, "_failed", set())
    monkeypatch.setenv("MEMCOMP_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="PTX JIT"):
        quant._cuda_call(x, "pack", x)


def test_bad_backend_is_named(monkeypatch) -> None:
    monkeypatch.setenv("MEMCOMP_KERNELS", "fast")
    with pytest.raises(ValueError, match="MEMCOMP_KERNELS='fast'.*auto, cpp, cuda, triton, torch"):
        kernels.backend()
    with pytest.raises(ValueError, match="kernel backend 'fast'"):
        kernels.set_backend("fast")


def test_unknown_extension_is_refused() -> None:
    with pytest.raises(FileNotFoundError, match="no CUDA or C\\+\\+ source for extension 'nope'"):
        kernels.load_extension("nope")


def test_list_names_the_cpu_and_cuda_extensions(capsys) -> None:
    assert kernels.main(["--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "codecs_cpu (C++, CPU)" in out and "quant_pack (CUDA)" in out


def test_memcomp_kernels_subcommand(capsys) -> None:
    from lightning_memcomp.cli import main

    assert main(["kernels", "--list"]) == 0
    assert "codecs_cpu (C++, CPU)" in capsys.readouterr().out


def test_cuda_extensions_without_a_gpu_or_an_arch_list_are_skipped_or_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert kernels.cuda_extensions(), "the CUDA sources are part of the repository"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(kernels, "_cuda_toolkit", lambda: True)
    loaded: list[str] = []
    monkeypatch.setattr(kernels, "_load", lambda name: loaded.append(name) or SimpleNamespace(__file__=name))
    built = kernels.build_all()
    assert loaded == kernels.cpu_extensions()  # PyTorch would fail on an empty architecture list (IndexError)
    for name in kernels.cuda_extensions():
        assert built[name].startswith("skipped: no GPU") and "TORCH_CUDA_ARCH_LIST" in built[name]
    name = kernels.cuda_extensions()[0]
    with pytest.raises(ValueError, match=f"cannot compile the CUDA extension '{name}'.*TORCH_CUDA_ARCH_LIST=9.0"):
        kernels.build_all([name])
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    kernels.build_all([name])
    assert loaded[-1] == name
