"""Lazy loader for the CUDA sources in ``cuda/`` with pure-torch fallbacks.

Each extension is one file ``cuda/<name>.cu`` (plus an optional ``cuda/<name>.cpp`` with the pybind
bindings); it is compiled with :func:`torch.utils.cpp_extension.load` the first time it is asked for on a
CUDA tensor, and cached. The environment variable ``MEMCOMP_KERNELS`` (or :func:`set_backend`) picks:

* ``auto`` (default): the CUDA extension for CUDA tensors when it builds, the torch path otherwise;
* ``cuda``: always the extension for CUDA tensors; a build failure is an error;
* ``torch``: never the extension.

``python -m lightning_memcomp.kernels --build`` compiles every extension (used by CI when ``nvcc``
is present, so a kernel that does not build fails the run).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import ModuleType

import torch

_failed: set[str] = set()

__all__ = ["available_extensions", "backend", "build_all", "load_extension", "set_backend", "use_cuda_kernel"]

BACKENDS = ("auto", "cuda", "torch")
_backend: str | None = None


def _sources_dir() -> Path:
    # installed: shipped as the package data lightning_memcomp._cuda; in a source checkout the same
    # folder is ../cuda (mapped by pyproject's package-dir). Never a bare "cuda" folder elsewhere:
    # site-packages/cuda belongs to NVIDIA's cuda-bindings.
    try:
        return Path(str(resources.files("lightning_memcomp._cuda")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "cuda"


def available_extensions() -> list[str]:
    """Names of the extensions whose sources ship with the package."""
    return sorted(p.stem for p in _sources_dir().glob("*.cu"))


def backend() -> str:
    value = _backend or os.environ.get("MEMCOMP_KERNELS", "auto")
    if value not in BACKENDS:
        raise ValueError(f"MEMCOMP_KERNELS={value!r} is not a kernel backend; allowed: {', '.join(BACKENDS)}")
    return value


def set_backend(value: str | None) -> None:
    """Force ``"cuda"`` or ``"torch"`` kernels (``"auto"`` or ``None`` restores the default)."""
    global _backend
    if value is not None and value not in BACKENDS:
        raise ValueError(f"kernel backend {value!r} is not one of {', '.join(BACKENDS)}")
    _backend = value


@lru_cache(maxsize=None)
def _load(name: str) -> ModuleType:
    from torch.utils.cpp_extension import load

    src = _sources_dir()
    sources = [str(src / f"{name}.cu")]
    if (src / f"{name}.cpp").exists():
        sources.insert(0, str(src / f"{name}.cpp"))
    if not Path(sources[-1]).exists():
        raise FileNotFoundError(f"no CUDA source for extension {name!r}; available: {available_extensions()}")
    build_dir = Path(os.environ.get("MEMCOMP_BUILD_DIR", Path.home() / ".cache" / "lightning_memcomp" / "build")) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(
        name=f"memcomp_{name}",
        sources=sources,
        build_directory=str(build_dir),
        extra_cuda_cflags=["-O3", "--use_fast_math"],
        extra_cflags=["-O3"],
        verbose=bool(os.environ.get("MEMCOMP_VERBOSE_BUILD")),
    )


def load_extension(name: str) -> ModuleType:
    """Compile (once) and return the extension ``memcomp_<name>``."""
    return _load(name)


def use_cuda_kernel(name: str, tensor: torch.Tensor) -> ModuleType | None:
    """The extension to use for ``tensor``, or ``None`` for the torch path (per the backend)."""
    mode = backend()
    if mode == "torch" or not tensor.is_cuda:
        return None
    if mode == "cuda":
        return _load(name)
    if name in _failed:
        return None
    try:
        return _load(name)
    except Exception as err:  # noqa: BLE001 - any build failure falls back, once, with a warning
        _failed.add(name)
        warnings.warn(f"CUDA extension {name!r} unavailable ({err}); using the torch path", stacklevel=2)
        return None


def build_all(names: list[str] | None = None) -> dict[str, str]:
    """Compile the named (default: all) extensions; returns name -> module file."""
    built = {}
    for name in names or available_extensions():
        module = _load(name)
        built[name] = getattr(module, "__file__", "?")
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_memcomp.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="compile every extension in cuda/")
    parser.add_argument("--list", action="store_true", help="list the extensions")
    args = parser.parse_args(argv)
    if args.list or not args.build:
        print("\n".join(available_extensions()) or "(no CUDA sources)")
    if args.build:
        for name, path in build_all().items():
            print(f"built {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
