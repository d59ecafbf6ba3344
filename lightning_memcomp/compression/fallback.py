"""Transform codecs where they are accurate, quantization elsewhere.

A top-k transform codec (``wavelet``, ``dct``, ``threshold``) keeps ``N / lambda`` coefficients whatever the tensor
looks like. On smooth maps that is accurate; on the noise-like maps of depthwise/squeeze-excitation networks it is
not (issue 16: EfficientNet-B0 parameter-gradient cosine 0.26 with ``wavelet`` or ``dct`` at lambda 10). The
transforms are orthonormal, so the relative error of a payload follows from energies at encode time, without a
decode: ``error^2 = 1 - |kept coefficients|^2 / |x|^2``. :class:`TransformOrQuant` keeps the transform's payload
where that error is at most ``max_error`` and stores the tensor with the fallback codec (``quant``, 4 bits)
otherwise. The default ``max_error = 0.1`` is about the relative RMS error of 4-bit quantization of Gaussian data
(a step of ``5.5 sigma / 15``, ``step / sqrt(12) = 0.106 sigma``): the transform is used where it is no worse
than the fallback. The ledger counts each tensor under the codec that stored it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_memcomp.compression.threshold import TopKPayload
from lightning_memcomp.memory.engine import Codec, SaveContext

__all__ = ["TransformOrQuant", "relative_error"]


@dataclass
class _Stored:
    codec: Codec
    payload: Any


def relative_error(codec: Codec, payload: TopKPayload, tensor: Tensor) -> float:
    """``|x - decode(payload)| / |x|`` of a top-k payload of ``codec``. From energies when the coefficients cover the
    tensor's own shape (an orthonormal transform: the error is the energy left out; before the exact masks, which
    only make it smaller); by decoding when the transform padded the map (a wavelet on 28x28 at 3 levels pads to
    32x32, and its periodized extension does not preserve energy)."""
    x = tensor.detach().float()
    total = float(x.square().sum())
    if total == 0.0:
        return 0.0
    if tuple(payload.coeff_shape) != tuple(payload.shape):
        return math.sqrt(float((codec.decode(payload).float() - x).square().sum()) / total)
    values = payload.coeffs.values.float()
    if payload.value_scale is not None:
        values = values / payload.value_scale
    kept = float(values.square().sum())
    return math.sqrt(max(0.0, 1.0 - kept / total))


class TransformOrQuant(Codec):
    """``transform`` where its relative error is at most ``max_error``, ``fallback`` elsewhere (module doc)."""

    compresses = True

    def __init__(self, transform: Codec, fallback: Codec, max_error: float) -> None:
        if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not 0 <= max_error <= 1:
            raise ValueError(f"transform_max_error={max_error!r} is not allowed; use a number from 0 to 1, or None")
        self.transform = transform
        self.fallback = fallback
        self.max_error = float(max_error)
        self.name = transform.name

    def accepts(self, tensor: Tensor, ctx: SaveContext) -> bool:
        return self.transform.accepts(tensor, ctx) or self.fallback.accepts(tensor, ctx)

    def encode(self, tensor: Tensor, ctx: SaveContext) -> Any:
        if self.transform.accepts(tensor, ctx):
            payload = self.transform.encode(tensor, ctx)
            if payload is tensor:
                return tensor  # declined (NaN/Inf, lambda 1): kept as it is
            if (not isinstance(payload, TopKPayload)
                    or relative_error(self.transform, payload, tensor) <= self.max_error):
                return _Stored(self.transform, payload)
        if not self.fallback.accepts(tensor, ctx):
            return tensor
        payload = self.fallback.encode(tensor, ctx)
        return tensor if payload is tensor else _Stored(self.fallback, payload)

    def payload_name(self, payload: Any) -> str:
        return payload.codec.name if isinstance(payload, _Stored) else self.name

    def decode(self, payload: Any) -> Tensor:
        if isinstance(payload, _Stored):
            return payload.codec.decode(payload.payload)
        return payload

    def decode_batch(self, payload: Any, start: int, stop: int) -> Tensor | None:
        if isinstance(payload, _Stored):
            return payload.codec.decode_batch(payload.payload, start, stop)
        return None

    def stored_nbytes(self, payload: Any) -> int:
        if isinstance(payload, _Stored):
            return payload.codec.stored_nbytes(payload.payload)
        return payload.numel() * payload.element_size()

    def reseed(self, seed: int, step: int = 0) -> None:
        self.transform.reseed(seed, step)
        self.fallback.reseed(seed, step)

    def __repr__(self) -> str:
        return f"TransformOrQuant({self.transform!r}, fallback={self.fallback!r}, max_error={self.max_error:g})"
