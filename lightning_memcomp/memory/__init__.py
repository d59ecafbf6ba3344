"""Measuring memory: the saved-tensor engine and its ledger, CUDA/NVML/RSS readings, MemoryMonitor."""

from lightning_memcomp.memory.engine import (
    Codec,
    IdentityCodec,
    SaveContext,
    SavedTensorEngine,
    payload_nbytes,
    track_saved_tensors,
)
from lightning_memcomp.memory.ledger import Ledger, ModuleMemory

__all__ = [
    "Codec",
    "IdentityCodec",
    "Ledger",
    "ModuleMemory",
    "SaveContext",
    "SavedTensorEngine",
    "payload_nbytes",
    "track_saved_tensors",
]
