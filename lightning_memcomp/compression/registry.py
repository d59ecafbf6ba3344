"""Codec names and where each lives; codec modules are imported only when asked for."""

from __future__ import annotations

import importlib
from typing import Any

from lightning_memcomp.memory.engine import Codec, IdentityCodec

# name -> "module:Class". Every codec takes its options as keyword arguments and validates them.
CODECS: dict[str, str] = {
    "identity": "lightning_memcomp.memory.engine:IdentityCodec",
    "quant": "lightning_memcomp.compression.quant:QuantCodec",
    "blpa": "lightning_memcomp.compression.blpa:BLPACodec",
    "wavelet": "lightning_memcomp.compression.wavelet:WaveletCodec",
    "dct": "lightning_memcomp.compression.dct:DCTCodec",
    "threshold": "lightning_memcomp.compression.threshold:ThresholdCodec",
}


def available_codecs() -> list[str]:
    return list(CODECS)


def register_codec(name: str, target: str | type) -> None:
    """Make a codec class (or ``"module:Class"``) available under ``name``."""
    if isinstance(target, type):
        target = f"{target.__module__}:{target.__qualname__}"
    CODECS[name] = target


def make_codec(codec: str | Codec, **options: Any) -> Codec:
    """Build a codec from its name and options, or return a given instance (then no options allowed)."""
    if isinstance(codec, Codec):
        if options:
            raise TypeError(f"options {sorted(options)} given together with a codec instance {codec!r}")
        return codec
    if not isinstance(codec, str) or codec not in CODECS:
        raise ValueError(f"codec={codec!r} is not a known codec; allowed: {', '.join(CODECS)}")
    module_name, _, class_name = CODECS[codec].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if cls is IdentityCodec:
        if options:
            raise TypeError(f"codec 'identity' takes no options, got {sorted(options)}")
        return cls()
    return cls(**options)
