"""lightning_memcomp: cut the GPU memory of training convolutional networks, as Lightning callbacks.

Techniques (each usable without Lightning, each with a callback):

* band-limited FFT convolutions (Dziedzic et al., ICML 2019): :func:`band_limit`, :class:`BandLimiting`
* convolutional slice generators, CSG/BCSG (Omidvar et al., AISTATS 2021): :func:`slice_generate`,
  :func:`fold_slices`, :class:`ConvSliceGeneration`
* activation compression for backward (BLPA, Chakrabarti & Moseley, NeurIPS 2019; Vu et al., TMLR 2024):
  :func:`compress_activations`, :class:`ActivationCompression`
* memory measurement: :func:`track_saved_tensors`, :class:`MemoryMonitor`
* the alternative they are compared with, activation checkpointing: :func:`checkpoint_forward`,
  :class:`ActivationCheckpointing`
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_memcomp.memory.engine import Codec, SavedTensorEngine, track_saved_tensors
from lightning_memcomp.memory.ledger import Ledger, ModuleMemory
from lightning_memcomp.surgery import ConversionReport
from lightning_memcomp import strategies as _strategies  # noqa: F401  registers "memcomp", "ddp_memcomp"

__version__ = "0.1.0"

# Technique packages load on first use; the strategies (and so Lightning) load eagerly, because
# Trainer(strategy="memcomp") needs them registered before it looks the name up.
_LAZY = {
    "MemoryMonitor": "lightning_memcomp.memory.monitor",
    "compress_activations": "lightning_memcomp.compression",
    "ActivationCompression": "lightning_memcomp.compression",
    "available_codecs": "lightning_memcomp.compression",
    "PrecisionPolicy": "lightning_memcomp.compression",
    "band_limit": "lightning_memcomp.bandlimit",
    "BandLimiting": "lightning_memcomp.bandlimit",
    "slice_generate": "lightning_memcomp.csg",
    "fold_slices": "lightning_memcomp.csg",
    "load_converted": "lightning_memcomp.checkpoint",
    "ConvSliceGeneration": "lightning_memcomp.csg",
    "ActivationCheckpointing": "lightning_memcomp.recompute",
    "checkpoint_forward": "lightning_memcomp.recompute",
    "plan_batch_size": "lightning_memcomp.plan",
    "BatchSizePlanner": "lightning_memcomp.plan",
    "MemCompSingleDeviceStrategy": "lightning_memcomp.strategies",
    "DDPMemCompStrategy": "lightning_memcomp.strategies",
}

__all__ = [
    "Codec",
    "ConversionReport",
    "Ledger",
    "ModuleMemory",
    "SavedTensorEngine",
    "track_saved_tensors",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_memcomp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
