"""Lazy loader of the compiled kernels in ``cuda/`` (CUDA and CPU) with pure-torch fallbacks.

Extensions, compiled with :func:`torch.utils.cpp_extension.load` the first time they are asked for, and
cached in ``$MEMCOMP_BUILD_DIR`` (default ``~/.cache/lightning_memcomp/build``):

* CUDA: one file ``cuda/<name>.cu`` (plus an optional ``cuda/<name>.cpp`` with the pybind bindings), built
  with ``nvcc`` (``quant_pack``: the ``quant`` codec; ``complex_mac``: the band-limited convolutions);
* CPU: one file ``cuda/<name>_cpu.cpp``, built with the system C++ compiler (``$CXX``, default ``c++``)
  and OpenMP, flags ``-O3 -fopenmp -ffp-contract=off -fno-trapping-math`` (no fast-math: no fused
  multiply-add and no reassociation, so the kernels give the torch references' bits; floating-point traps
  are never enabled, which lets the compiler turn the kernels' float selects into vector code)
  (``codecs_cpu``: the ``quant`` and ``blpa`` codecs).

The environment variable ``MEMCOMP_KERNELS`` (or :func:`set_backend`) picks the implementation:

* ``auto`` (default): for CPU tensors the C++ extension; for CUDA tensors the Triton kernel where Triton
  imports (it ships with PyTorch's CUDA wheels and needs no ``nvcc``), else the CUDA extension. When the
  compiler is missing, a build fails or a Triton kernel fails to compile at its first call: one one-line
  warning and the next variant, down to the torch path (never an error);
* ``cpp``: the C++ extension for CPU tensors, a build failure is an error; CUDA tensors take the torch path;
* ``cuda``: the CUDA extension for CUDA tensors, a build failure is an error; CPU tensors take the torch path;
* ``triton``: the Triton kernels (``lightning_memcomp.compression.quant_triton``) for CUDA tensors, a missing
  Triton or a failed compilation is an error; CPU tensors take the torch path;
* ``torch``: the torch path (the reference) everywhere.

So a kernel is chosen, in this order (the first that works): for a CPU tensor, C++ extension -> torch path;
for a CUDA tensor, Triton -> CUDA extension -> torch path. A forced backend takes only its own variant.
float64 tensors always take the torch path. Which kernels exist: ``quant`` (C++, Triton, CUDA), ``blpa``
(C++), the band-limited convolutions' complex multiply-accumulate (CUDA).

``python -m lightning_memcomp.kernels --build`` (or ``memcomp kernels --build``) compiles every extension
(CUDA ones only where ``nvcc`` is found, else they are reported as skipped), so a kernel that does not build
fails the run; ``--list`` names them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

from lightning_memcomp.short_errors import ShortArgumentParser

__all__ = [
    "available_extensions",
    "backend",
    "build_all",
    "cpu_extensions",
    "cuda_extensions",
    "load_extension",
    "set_backend",
    "triton_failed",
    "use_cpu_kernel",
    "use_cuda_kernel",
    "use_triton_kernel",
]

BACKENDS = ("auto", "cpp", "cuda", "triton", "torch")
CPU_SUFFIX = "_cpu"
CPU_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
_backend: str | None = None
_failed: set[str] = set()


def _sources_dir() -> Path:
    # installed: shipped as the package data lightning_memcomp._cuda; in a source checkout the same
    # folder is ../cuda (mapped by pyproject's package-dir). Never a bare "cuda" folder elsewhere:
    # site-packages/cuda belongs to NVIDIA's cuda-bindings.
    try:
        return Path(str(resources.files("lightning_memcomp._cuda")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "cuda"


def cuda_extensions() -> list[str]:
    """Names of the CUDA extensions (``cuda/<name>.cu``) that ship with the package."""
    return sorted(p.stem for p in _sources_dir().glob("*.cu"))


def cpu_extensions() -> list[str]:
    """Names of the CPU extensions (``cuda/<name>_cpu.cpp``) that ship with the package."""
    return sorted(p.stem for p in _sources_dir().glob(f"*{CPU_SUFFIX}.cpp"))


def available_extensions() -> list[str]:
    """Names of every extension whose sources ship with the package, CUDA and CPU."""
    return sorted(cuda_extensions() + cpu_extensions())


def backend() -> str:
    value = _backend or os.environ.get("MEMCOMP_KERNELS", "auto")
    if value not in BACKENDS:
        raise ValueError(f"MEMCOMP_KERNELS={value!r} is not a kernel backend; allowed: {', '.join(BACKENDS)}")
    return value


def set_backend(value: str | None) -> None:
    """Force ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"torch"`` kernels (``"auto"`` or ``None``: the default)."""
    global _backend
    if value is not None and value not in BACKENDS:
        raise ValueError(f"kernel backend {value!r} is not one of {', '.join(BACKENDS)}")
    _backend = value


def _build_root() -> Path:
    return Path(os.environ.get("MEMCOMP_BUILD_DIR", Path.home() / ".cache" / "lightning_memcomp" / "build"))


@contextmanager
def _quiet_torch_build() -> Iterator[None]:
    """torch's own notes while importing the builder (e.g. "No CUDA runtime is found") and its warnings
    while building stay out of the user's log: a failure is reported once, by the caller."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


@lru_cache(maxsize=None)
def _load(name: str) -> ModuleType:
    src = _sources_dir()
    cpu = (src / f"{name}.cpp").exists() and name.endswith(CPU_SUFFIX)
    if not cpu and not (src / f"{name}.cu").exists():
        raise FileNotFoundError(f"no CUDA or C++ source for extension {name!r}; available: {available_extensions()}")
    if cpu:
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            raise RuntimeError(f"C++ compiler {compiler!r} not found (set CXX)")
    build_dir = _build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_torch_build():
        from torch.utils.cpp_extension import load

        if cpu:
            return load(name=f"memcomp_{name}", sources=[str(src / f"{name}.cpp")], build_directory=str(build_dir),
                        extra_cflags=CPU_FLAGS, extra_ldflags=["-fopenmp"], with_cuda=False,
                        verbose=bool(os.environ.get("MEMCOMP_VERBOSE_BUILD")))
        sources = [str(src / f"{name}.cu")]
        if (src / f"{name}.cpp").exists():
            sources.insert(0, str(src / f"{name}.cpp"))
        return load(name=f"memcomp_{name}", sources=sources, build_directory=str(build_dir),
                    extra_cuda_cflags=["-O3", "--use_fast_math"], extra_cflags=["-O3"],
                    verbose=bool(os.environ.get("MEMCOMP_VERBOSE_BUILD")))


def load_extension(name: str) -> ModuleType:
    """Compile (once) and return the extension ``memcomp_<name>``."""
    return _load(name)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _load_or_warn(name: str, forced: bool) -> ModuleType | None:
    """The extension; ``forced``: a failure raises, else it gives one one-line warning (per extension and
    process) and ``None``."""
    if forced:
        return _load(name)
    if name in _failed:
        return None
    try:
        return _load(name)
    except Exception as err:  # noqa: BLE001 - any build failure falls back, once, with a warning
        _failed.add(name)
        warnings.warn(f"lightning_memcomp: kernel {name!r} unavailable ({_first_line(err)}); using the torch path "
                      f"(MEMCOMP_KERNELS=torch silences this)", stacklevel=3)
        return None


def use_cuda_kernel(name: str, tensor: torch.Tensor) -> ModuleType | None:
    """The CUDA extension to use for ``tensor``, or ``None`` for another path (per the backend)."""
    mode = backend()
    if mode not in ("auto", "cuda") or not tensor.is_cuda:
        return None
    return _load_or_warn(name, forced=mode == "cuda")


def use_cpu_kernel(name: str, tensor: torch.Tensor) -> ModuleType | None:
    """The C++ extension to use for the CPU ``tensor``, or ``None`` for the torch path (per the backend)."""
    mode = backend()
    if mode not in ("auto", "cpp") or tensor.device.type != "cpu":
        return None
    return _load_or_warn(name, forced=mode == "cpp")


def use_triton_kernel(name: str, tensor: torch.Tensor) -> ModuleType | None:
    """The Triton module ``lightning_memcomp.compression.<name>`` for the CUDA ``tensor``, or ``None`` for
    another path: with the backend ``triton`` (an import failure raises) or ``auto`` (when the module imports,
    its ``available()`` says so and it has not failed before in this process)."""
    mode = backend()
    if mode not in ("auto", "triton") or not getattr(tensor, "is_cuda", False):
        return None
    key = f"triton:{name}"
    if mode == "auto" and key in _failed:
        return None
    try:
        module = importlib.import_module(f"lightning_memcomp.compression.{name}")
    except ImportError:
        if mode == "triton":
            raise
        _failed.add(key)
        return None
    available = getattr(module, "available", None)
    if available is not None and not available():
        if mode == "triton":
            raise RuntimeError(f"MEMCOMP_KERNELS=triton: the Triton kernels of {name!r} cannot run here "
                               "(Triton missing, or no CUDA device)")
        _failed.add(key)
        return None
    return module


def triton_failed(name: str, err: BaseException) -> None:
    """Record that the Triton module ``name`` failed (e.g. to compile) in ``auto`` mode: one one-line warning,
    and :func:`use_triton_kernel` returns ``None`` for it from now on. With ``MEMCOMP_KERNELS=triton`` the
    error is raised instead."""
    if backend() == "triton":
        raise err
    key = f"triton:{name}"
    if key not in _failed:
        _failed.add(key)
        warnings.warn(f"lightning_memcomp: Triton kernel {name!r} failed ({_first_line(err)}); using the next "
                      f"variant (MEMCOMP_KERNELS=cuda or torch silences this)", stacklevel=3)


def _cuda_toolkit() -> bool:
    with _quiet_torch_build():
        from torch.utils.cpp_extension import CUDA_HOME
    return CUDA_HOME is not None and shutil.which("nvcc", path=os.pathsep.join(
        [str(Path(CUDA_HOME) / "bin"), os.environ.get("PATH", "")])) is not None


def build_all(names: list[str] | None = None) -> dict[str, str]:
    """Compile the named (default: all) extensions; returns name -> module file. Without ``names``, the CUDA
    extensions are skipped (name -> ``"skipped: ..."``) where no CUDA toolkit is found."""
    built = {}
    skip_cuda = names is None and not _cuda_toolkit()
    # without a GPU, PyTorch cannot pick the architecture to compile for: TORCH_CUDA_ARCH_LIST must say it
    no_arch = not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available()
    for name in names or available_extensions():
        if skip_cuda and name in cuda_extensions():
            built[name] = "skipped: no CUDA toolkit (nvcc) found"
            continue
        if no_arch and name in cuda_extensions():
            reason = ("no GPU to take the architecture from and TORCH_CUDA_ARCH_LIST is not set; set it to the "
                      "GPU's compute capability, e.g. TORCH_CUDA_ARCH_LIST=9.0 for an H100")
            if names is not None:
                raise ValueError(f"cannot compile the CUDA extension {name!r}: {reason}")
            built[name] = f"skipped: {reason}"
            continue
        module = _load(name)
        built[name] = getattr(module, "__file__", "?")
    return built


def main(argv: list[str] | None = None) -> int:
    parser = ShortArgumentParser(prog="python -m lightning_memcomp.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="compile every extension in cuda/ (CUDA and CPU)")
    parser.add_argument("--list", action="store_true", help="list the extensions")
    parser.add_argument("names", nargs="*", help="with --build: only these extensions")
    args = parser.parse_args(argv)
    if args.list or not args.build:
        cpu = set(cpu_extensions())
        print("\n".join(f"{name} ({'C++, CPU' if name in cpu else 'CUDA'})" for name in available_extensions())
              or "(no kernel sources)")
    if args.build:
        for name, path in build_all(args.names or None).items():
            print(f"{name}: {path}" if path.startswith("skipped") else f"built {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
