"""Activation compression: codecs for what autograd saves for backward (forward stays exact)."""

from lightning_memcomp.compression.api import compress_activations, default_selection
from lightning_memcomp.compression.callback import ActivationCompression
from lightning_memcomp.compression.registry import available_codecs, make_codec, register_codec
from lightning_memcomp.compression.smooth import PrecisionPolicy

__all__ = [
    "ActivationCompression",
    "PrecisionPolicy",
    "available_codecs",
    "compress_activations",
    "default_selection",
    "make_codec",
    "register_codec",
]
