"""Top-k thresholding of activation maps: the paper's simple thresholding (ST) and the shared codec base.

Vu et al., "Reducing the memory of training by compressing the activation maps" (TMLR 2024): an
activation map ``X`` saved for backward is transformed, ``Y = W X`` (identity for ST, Sec. 3.1.3; wavelet
or DCT in :mod:`~lightning_memcomp.compression.wavelet` / :mod:`~lightning_memcomp.compression.dct`),
only its ``k = floor(N / lambda)`` largest-magnitude coefficients are kept (Sec. 3.2, Eq. 10-12), and they
are stored sparse (:mod:`~lightning_memcomp.compression.sparse`). Backward decodes ``X ~= W^T Y_l``.

Choices beyond the paper, shared by the three codecs:

* ``compression_ratio=1`` stores the tensor itself: gradients are bit-for-bit those of training without
  compression, with no transform round trip.
* Tensors whose values decide where gradients flow keep that decision exact. The output of a ReLU (a
  ``nn.ReLU`` module, or any tensor produced by ``relu``) carries a 1-bit mask ``x > 0``: backward sees the
  reconstruction clamped to a positive value inside the mask and exactly 0 outside, so the ReLU routes
  gradients exactly and the next layer (which shares the stored tensor) gets a better reconstruction.
  Inputs of ``LeakyReLU``/``PReLU``/``ELU``/``CELU``/``SELU``/``RReLU`` keep a sign mask, those of
  ``Hardtanh``/``ReLU6`` two masks (at/below ``min_val``, at/above ``max_val``); tensors saved inside
  ``Hardswish``, ``Hardsigmoid``, ``Threshold``, ``Hardshrink`` and ``Softshrink`` are kept exact.
  The engine packs a storage once, in the context of the module that saved it first: a ReLU's output is
  always first saved by the ReLU, but a tensor that, say, a convolution saved before a ``LeakyReLU`` saves
  it as its input is reused without a sign mask (select the activation, or apply it in place, to avoid it).
* A tensor holding NaN or Inf (or whose transform overflows) is kept as it is (counted as passthrough):
  a transform would spread one non-finite value over its block. Decoded values are clamped to the
  dtype's finite range, so a float16 reconstruction never rounds to Inf.
* ``per_sample=True`` keeps ``floor(N_sample / lambda)`` coefficients in every sample instead of
  ``floor(N / lambda)`` over the whole tensor (the paper's choice, the default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_memcomp.compression.sparse import SparseCoefficients, keep_topk, pack_bits, unpack_bits
from lightning_memcomp.memory.engine import Codec, SaveContext

__all__ = ["ThresholdCodec", "TopKCodec", "TopKPayload", "mask_mode"]

_POSITIVE_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU,)
_SIGN_MODULES: tuple[type[nn.Module], ...] = (nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.RReLU)
_BAND_MODULES: tuple[type[nn.Module], ...] = (nn.Hardtanh,)  # ReLU6 is a Hardtanh
_EXACT_MODULES: tuple[type[nn.Module], ...] = (nn.Hardswish, nn.Hardsigmoid, nn.Threshold, nn.Hardshrink,
                                               nn.Softshrink)
_FP16_SAFE = 32768.0  # scaled float16 values stay below this, so the cast never rounds to Inf
_VALUE_DTYPES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32,
}


def mask_mode(tensor: Tensor, module: nn.Module | None) -> str | None:
    """How a saved tensor's gradient-routing decision is kept exact: ``"positive"``, ``"sign"``,
    ``"band"``, ``"exact"`` (store as is) or ``None`` (nothing to keep)."""
    if isinstance(module, _POSITIVE_MODULES):
        return "positive"
    if isinstance(module, _SIGN_MODULES):
        return "sign"
    if isinstance(module, _BAND_MODULES):
        return "band"
    if isinstance(module, _EXACT_MODULES):
        return "exact"
    grad_fn = tensor.grad_fn
    if grad_fn is not None and type(grad_fn).__name__.startswith("ReluBackward"):
        return "positive"  # a functional relu inside a larger module
    return None


@dataclass(eq=False)
class TopKPayload:
    """What a top-k codec keeps for one saved tensor."""

    coeffs: SparseCoefficients
    coeff_shape: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    meta: Any
    mode: str | None
    masks: tuple[Tensor, ...]
    bounds: tuple[float, float] | None
    memory_format: torch.memory_format
    value_scale: Tensor | None = None  # 0-d: float16 values were stored times this power of two

    @property
    def nbytes(self) -> int:
        return self.coeffs.nbytes + sum(m.numel() * m.element_size() for m in self.masks)


def _step_towards(a: float, b: float, dtype: torch.dtype) -> float:
    """The ``dtype`` value next to ``a`` in the direction of ``b``, never subnormal (which kernels may flush
    to zero); computed on the host from two scalars, so no device sync."""
    stepped = torch.nextafter(torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype)).item()
    tiny = torch.finfo(dtype).tiny
    if abs(stepped) < tiny:
        stepped = math.copysign(tiny, b - a)
    return stepped


def _memory_format(t: Tensor) -> torch.memory_format:
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class TopKCodec(Codec):
    """Base of the transform-domain codecs: transform, keep the top ``k``, store sparse, invert on decode.

    Subclasses override :meth:`forward_transform` and :meth:`inverse_transform` (identity here).

    Args:
        compression_ratio: ``lambda >= 1``; ``k = floor(N / lambda)`` coefficients are kept. ``1`` keeps
            the tensor itself (bit-for-bit gradients).
        per_sample: threshold each sample (first dimension) separately instead of the whole tensor.
        value_dtype: dtype of the kept values: ``None`` (the tensor's), ``"float16"``, ``"bfloat16"`` or
            ``"float32"`` (or the torch dtypes).

    Raises:
        ValueError: ``compression_ratio`` below 1 or not finite; ``value_dtype`` not allowed.
    """

    name = "topk"
    compresses = True

    def __init__(
        self,
        compression_ratio: float = 10.0,
        *,
        per_sample: bool = False,
        value_dtype: str | torch.dtype | None = None,
    ) -> None:
        if isinstance(compression_ratio, bool) or not isinstance(compression_ratio, (int, float)):
            raise ValueError(
                f"compression_ratio={compression_ratio!r} is not allowed; use a number >= 1 (lambda of Vu et al.)"
            )
        if not math.isfinite(compression_ratio) or compression_ratio < 1:
            raise ValueError(
                f"compression_ratio={compression_ratio!r} is not allowed; use a finite number >= 1 "
                "(1 keeps the tensor as it is, 10 keeps a tenth of the coefficients)"
            )
        if not isinstance(per_sample, bool):
            raise ValueError(f"per_sample={per_sample!r} is not allowed; use True or False")
        self.compression_ratio = float(compression_ratio)
        self.per_sample = per_sample
        self.value_dtype = self._parse_value_dtype(value_dtype)

    @staticmethod
    def _parse_value_dtype(value_dtype: str | torch.dtype | None) -> torch.dtype | None:
        if value_dtype is None:
            return None
        if isinstance(value_dtype, torch.dtype) and value_dtype in _VALUE_DTYPES.values():
            return value_dtype
        if isinstance(value_dtype, str) and value_dtype in _VALUE_DTYPES:
            return _VALUE_DTYPES[value_dtype]
        raise ValueError(
            f"value_dtype={value_dtype!r} is not allowed; use None (the tensor's dtype), 'float16', "
            "'bfloat16' or 'float32'"
        )

    # -- the transform (identity: simple thresholding) ------------------------------------------------
    def forward_transform(self, x: Tensor) -> tuple[Tensor, Any]:
        """``Y = W X``; returns the coefficients and what the inverse needs besides them."""
        return x, None

    def inverse_transform(self, coeffs: Tensor, meta: Any, shape: tuple[int, ...]) -> Tensor:
        """``X ~= W^T Y_l``, of ``shape``."""
        return coeffs.reshape(shape)

    # -- Codec -----------------------------------------------------------------------------------------
    def accepts(self, tensor: Tensor, ctx: SaveContext) -> bool:
        return super().accepts(tensor, ctx) and tensor.dim() >= 1

    def keep_count(self, n: int) -> int:
        """``k = floor(n / lambda)`` (Vu et al. Sec. 3.2)."""
        return math.floor(n / self.compression_ratio)

    def encode(self, tensor: Tensor, ctx: SaveContext) -> Tensor | TopKPayload:
        if self.compression_ratio == 1.0:
            return tensor  # the baseline: no transform round trip at all
        mode = mask_mode(tensor, ctx.module)
        if mode == "exact":
            return tensor
        with torch.no_grad():
            x = tensor.detach()
            coeffs, meta = self.forward_transform(x)
            if not bool(torch.isfinite(coeffs).all()):
                return tensor  # NaN/Inf (or a transform overflow) would spread: kept as it is
            rows = x.shape[0] if self.per_sample and x.dim() >= 2 else 1
            k = self.keep_count(x.numel() // rows)
            value_dtype = self.value_dtype or x.dtype
            value_scale = None
            if value_dtype == torch.float16:
                # an orthogonal transform gathers up to sqrt(block) times the largest value into one
                # coefficient: scale by a power of two so no kept value exceeds float16's range (no sync)
                amax = coeffs.abs().amax().float()
                value_scale = torch.exp2(-torch.ceil(torch.log2(amax / _FP16_SAFE)).clamp(min=0))
                coeffs = coeffs * value_scale.to(coeffs.dtype)
            kept = keep_topk(coeffs.reshape(rows, -1), k, value_dtype=value_dtype)
            masks: tuple[Tensor, ...] = ()
            bounds = None
            flat = x.reshape(1, -1)
            if mode in ("positive", "sign"):
                masks = (pack_bits(flat > 0),)
            elif mode == "band":
                lo, hi = float(ctx.module.min_val), float(ctx.module.max_val)  # type: ignore[union-attr]
                masks = (pack_bits(flat <= lo), pack_bits(flat >= hi))
                bounds = (lo, hi)
        return TopKPayload(kept, tuple(coeffs.shape), tuple(x.shape), x.dtype, meta, mode, masks, bounds,
                           _memory_format(x), value_scale)

    def decode(self, payload: Tensor | TopKPayload) -> Tensor:
        if isinstance(payload, Tensor):
            return payload
        with torch.no_grad():
            dense = payload.coeffs.to_dense().reshape(payload.coeff_shape)
            if payload.value_scale is not None:
                dense = dense.to(torch.promote_types(dense.dtype, torch.float32)) / payload.value_scale
            x = self.inverse_transform(dense, payload.meta, payload.shape)
            finfo = torch.finfo(payload.dtype)
            if finfo.max < torch.finfo(x.dtype).max:  # a reconstruction never rounds to Inf
                x = x.clamp(-finfo.max, finfo.max)
            x = x.to(payload.dtype)
            if payload.mode is not None:
                x = self._apply_masks(x, payload)
            return x.contiguous(memory_format=payload.memory_format)

    @staticmethod
    def _apply_masks(x: Tensor, payload: TopKPayload) -> Tensor:
        n = x.numel()
        shape = payload.shape
        if payload.mode in ("positive", "sign"):
            inside = unpack_bits(payload.masks[0], n).reshape(shape)
            tiny = torch.nextafter(x.new_zeros(()), x.new_ones(()))  # the smallest positive (subnormal) value
            outside = x.new_zeros(()) if payload.mode == "positive" else x.clamp_max(0)
            return torch.where(inside, x.clamp_min(tiny), outside)
        assert payload.bounds is not None
        lo, hi = payload.bounds
        below = unpack_bits(payload.masks[0], n).reshape(shape)
        above = unpack_bits(payload.masks[1], n).reshape(shape)
        inner = x.clamp(_step_towards(lo, hi, x.dtype), _step_towards(hi, lo, x.dtype))
        return torch.where(below, x.new_full((), lo), torch.where(above, x.new_full((), hi), inner))

    def stored_nbytes(self, payload: Tensor | TopKPayload) -> int:
        if isinstance(payload, Tensor):
            return payload.numel() * payload.element_size()
        return payload.nbytes

    def __repr__(self) -> str:
        extra = ", per_sample=True" if self.per_sample else ""
        if self.value_dtype is not None:
            extra += f", value_dtype={self.value_dtype}"
        return f"{type(self).__name__}(compression_ratio={self.compression_ratio:g}{self._repr_options()}{extra})"

    def _repr_options(self) -> str:
        return ""


class ThresholdCodec(TopKCodec):
    """Simple thresholding (ST, Vu et al. Sec. 3.1.3): top-k on the activation itself, any shape.

    Example::

        with compress_activations(model, codec="threshold", compression_ratio=10) as ledger:
            loss = criterion(model(x), y)
        loss.backward()
    """

    name = "threshold"
