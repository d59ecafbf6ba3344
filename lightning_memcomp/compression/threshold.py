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
* Bounded memory: encode and decode work span by span (about
  :data:`~lightning_memcomp.compression.sparse.CHUNK_ELEMENTS` coefficients of whole maps), recomputing a
  span's transform at each pass of the exact top-k selection rather than holding the transform
  (:func:`~lightning_memcomp.compression.sparse.select_topk`), and decode writes each span straight into
  the one output tensor, masks included. Beyond the saved tensor, its payload and (at decode) the output,
  the temporaries are a few spans, in buffers reused from call to call on the CPU
  (:func:`~lightning_memcomp.compression.transforms.shared_scratch`): measured on a 128 MiB float32 tensor,
  payload + 6-15 MiB at encode and output + 3-15 MiB at decode, where the full-tensor implementation this
  replaced took payload + 660-785 MiB and output + 96-544 MiB.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_memcomp.compression import sparse
from lightning_memcomp.compression.bitpack import from_memory_order
from lightning_memcomp.compression.sparse import SparseCoefficients, pack_bits, plan_spans, select_topk, unpack_bits
from lightning_memcomp.compression.transforms import Scratch, shared_scratch
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
    """What a top-k codec keeps for one saved tensor.

    ``masks`` are packed one bit per element in the tensor's memory order (``order``: the dimensions from
    outermost to innermost in memory, ``None`` for row-major), and the decoded tensor gets that order back.
    """

    coeffs: SparseCoefficients
    coeff_shape: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    meta: Any
    mode: str | None
    masks: tuple[Tensor, ...]
    bounds: tuple[float, float] | None
    order: tuple[int, ...] | None
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


def _dense_order(t: Tensor) -> tuple[int, ...] | None:
    """The dimensions of ``t`` from outermost to innermost in memory when ``t`` is dense but not row-major
    (``channels_last``, a transpose), else ``None``."""
    if t.is_contiguous():
        return None
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d])))
    return order if t.permute(order).is_contiguous() else None


def _in_memory_order(t: Tensor, order: tuple[int, ...] | None) -> Tensor:
    """``t`` flattened in memory order: a view when ``t`` is dense (a row-major copy otherwise)."""
    return t.permute(order).reshape(-1) if order is not None else t.reshape(-1)


def _mask_step() -> int:
    return max(8, sparse.CHUNK_ELEMENTS // 8 * 8)


def _pack_mask(flat: Tensor, compare: Callable[..., Tensor], value: float, scratch: Scratch) -> Tensor:
    """``compare(element, value)`` for every element of ``flat``, one bit each (uint8 ``[ceil(n / 8)]``),
    chunk by chunk."""
    out = torch.empty((flat.numel() + 7) // 8, dtype=torch.uint8, device=flat.device)
    step = _mask_step()
    for start in range(0, flat.numel(), step):
        chunk = flat[start:start + step]
        test = compare(chunk, value, out=scratch.get("keep", chunk.shape, torch.bool))
        bits = pack_bits(test, scratch=scratch)
        out[start // 8:start // 8 + bits.numel()] = bits
    return out


def _map_slices(g0: int, g1: int, channels: int, map_size: int) -> tuple[slice, ...]:
    """The ``[N, C, ...]`` slices of the maps a span covers (whole samples, or maps of one sample)."""
    m0, m1 = g0 // map_size, g1 // map_size
    if m0 % channels == 0 and m1 % channels == 0:
        return (slice(m0 // channels, m1 // channels),)
    sample = m0 // channels
    return (slice(sample, sample + 1), slice(m0 - sample * channels, m1 - sample * channels))


class TopKCodec(Codec):
    """Base of the transform-domain codecs: transform, keep the top ``k``, store sparse, invert on decode.

    Subclasses override :meth:`forward_transform` and :meth:`inverse_transform` (identity here) and set
    :attr:`spatial` when the transform runs on whole ``[*spatial]`` maps of ``[N, C, *spatial]`` tensors.

    Encode and decode work in spans of whole maps (:data:`~lightning_memcomp.compression.sparse.CHUNK_ELEMENTS`
    coefficients, at least one map; simple thresholding: spans of the tensor in memory order): the
    transform of a span is recomputed at each pass of the top-k selection (usually one counting pass and
    one storing pass for float32 coefficients, see
    :func:`~lightning_memcomp.compression.sparse.select_topk`) rather than held, and decoding inverts span
    by span straight into the one output tensor. Beyond the tensor, its payload and the output, no
    temporary grows with the tensor.

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
    #: the transform runs on whole maps of ``[N, C, *spatial]`` tensors (False: the identity, any shape)
    spatial = False

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
        """``Y = W X``; returns the coefficients and what the inverse needs besides them. Spatial codecs
        are called on spans of whole maps (``x[n0:n1]`` or ``x[n:n + 1, c0:c1]``) as well as on whole
        tensors."""
        return x, None

    def inverse_transform(self, coeffs: Tensor, meta: Any, shape: tuple[int, ...]) -> Tensor:
        """``X ~= W^T Y_l``, of ``shape``."""
        return coeffs.reshape(shape)

    def forward_span(self, x: Tensor, meta: Any, scratch: Scratch) -> Tensor:
        """:meth:`forward_transform` of a span of whole maps, ``meta`` already known; spatial codecs write it
        into ``scratch`` (valid until the next span)."""
        return self.forward_transform(x)[0]

    def inverse_span(self, coeffs: Tensor, meta: Any, shape: tuple[int, ...], scratch: Scratch) -> Tensor:
        """:meth:`inverse_transform` of a span of whole maps, into ``scratch`` for spatial codecs."""
        return self.inverse_transform(coeffs, meta, shape)

    # -- Codec -----------------------------------------------------------------------------------------
    def accepts(self, tensor: Tensor, ctx: SaveContext) -> bool:
        return super().accepts(tensor, ctx) and tensor.dim() >= 1

    def keep_count(self, n: int) -> int:
        """``k = floor(n / lambda)`` (Vu et al. Sec. 3.2)."""
        return math.floor(n / self.compression_ratio)

    def _spans_geometry(self, coeff_shape: tuple[int, ...], rows: int) -> tuple[int, int]:
        """(block, unit) of :func:`~lightning_memcomp.compression.sparse.plan_spans`: a sample and a map
        for spatial codecs, a row and an element for the identity."""
        if self.spatial:
            unit = math.prod(coeff_shape[2:])
            return coeff_shape[1] * unit, unit
        return math.prod(coeff_shape) // rows, 1

    def encode(self, tensor: Tensor, ctx: SaveContext) -> Tensor | TopKPayload:
        if self.compression_ratio == 1.0:
            return tensor  # the baseline: no transform round trip at all
        mode = mask_mode(tensor, ctx.module)
        if mode == "exact":
            return tensor
        with torch.no_grad():
            x = tensor.detach()
            scratch = shared_scratch(x.device)
            rows = x.shape[0] if self.per_sample and x.dim() >= 2 and x.shape[0] > 0 else 1
            order = _dense_order(x)
            if not self.spatial and rows > 1 and order is not None and order[0] != 0:
                x, order = x.contiguous(), None  # per-sample thresholding reads each sample as one span
            flat = _in_memory_order(x, order) if not self.spatial or mode is not None else None
            if self.spatial:
                if x.numel() == 0:
                    probe, meta = self.forward_transform(x)
                else:
                    probe, meta = self.forward_transform(x[:1, :1])
                coeff_shape = (*x.shape[:2], *probe.shape[2:])
                channels, map_size = x.shape[1], math.prod(probe.shape[2:])

                def read(g0: int, g1: int) -> Tensor:
                    span = x[_map_slices(g0, g1, channels, map_size)]
                    return self.forward_span(span, meta, scratch).reshape(-1)
            else:
                assert flat is not None
                probe, meta, coeff_shape = x, None, tuple(x.shape)

                def read(g0: int, g1: int) -> Tensor:
                    return flat[g0:g1]

            block, unit = self._spans_geometry(coeff_shape, rows)
            value_dtype = self.value_dtype or x.dtype
            # an orthogonal transform gathers up to sqrt(block) times the largest value into one coefficient:
            # float16 values are scaled by a power of two so that none exceeds float16's range (no sync)
            selected = select_topk(
                read, rows, math.prod(coeff_shape) // rows, self.keep_count(x.numel() // rows),
                dtype=probe.dtype, device=x.device, value_dtype=value_dtype, block=block, unit=unit,
                check_finite=True, fit_below=_FP16_SAFE if value_dtype == torch.float16 else None,
                scratch=scratch,
            )
            if selected is None:
                return tensor  # NaN/Inf (or a transform overflow) would spread: kept as it is
            kept, value_scale = selected
            masks: tuple[Tensor, ...] = ()
            bounds = None
            if mode is not None:
                assert flat is not None
                if mode in ("positive", "sign"):
                    masks = (_pack_mask(flat, torch.gt, 0, scratch),)
                else:
                    lo, hi = float(ctx.module.min_val), float(ctx.module.max_val)  # type: ignore[union-attr]
                    masks = (_pack_mask(flat, torch.le, lo, scratch), _pack_mask(flat, torch.ge, hi, scratch))
                    bounds = (lo, hi)
        return TopKPayload(kept, coeff_shape, tuple(x.shape), x.dtype, meta, mode, masks, bounds, order,
                           value_scale)

    def decode(self, payload: Tensor | TopKPayload) -> Tensor:
        if isinstance(payload, Tensor):
            return payload
        with torch.no_grad():
            coeffs = payload.coeffs
            flat = torch.empty(math.prod(payload.shape), dtype=payload.dtype, device=coeffs.values.device)
            out = from_memory_order(flat, payload.shape, payload.order)
            block, unit = self._spans_geometry(payload.coeff_shape, coeffs.rows)
            spans = plan_spans(coeffs.rows * coeffs.n, block, unit)
            limit = torch.finfo(payload.dtype).max
            padded = payload.coeff_shape[2:]
            scratch = shared_scratch(flat.device)
            for (g0, g1), dense in zip(spans, coeffs.iter_dense(spans, scratch)):
                if payload.value_scale is not None:
                    dense = dense.to(torch.promote_types(dense.dtype, torch.float32)) / payload.value_scale
                if self.spatial:
                    target = out[_map_slices(g0, g1, payload.coeff_shape[1], unit)]
                    rec = self.inverse_span(dense.reshape(*target.shape[:2], *padded), payload.meta,
                                            tuple(target.shape), scratch)
                else:
                    target, rec = flat[g0:g1], dense
                if limit < torch.finfo(rec.dtype).max:  # a reconstruction never rounds to Inf
                    rec = rec.clamp(-limit, limit)
                target.copy_(rec)
            if payload.mode is not None:
                self._apply_masks(flat, payload, scratch)
            return out

    @staticmethod
    def _apply_masks(flat: Tensor, payload: TopKPayload, scratch: Scratch) -> None:
        """Make the routing decision of the decoded tensor (``flat``: in memory order) exact, in place."""
        tiny = torch.nextafter(flat.new_zeros(()), flat.new_ones(()))  # the smallest positive (subnormal) value
        step = _mask_step()
        for start in range(0, flat.numel(), step):
            x = flat[start:start + step]
            b0, b1 = start // 8, (start + x.numel() + 7) // 8
            first = unpack_bits(payload.masks[0][b0:b1], x.numel(), scratch=scratch, name="keep")
            # arithmetic on 0/1 rather than branchy selects (masks are random, selects mispredict); exact
            # here: every value is finite, and x * 1 = x, x * 0 + y = y
            if payload.mode in ("positive", "sign"):
                # the 0/1 factors as floats in a reused buffer (a bool factor would be widened afresh, and
                # a bool -> float copy is ten times slower than uint8 -> float)
                inside = scratch.get("high", x.shape, x.dtype).copy_(first.view(torch.uint8))
            if payload.mode == "positive":
                x.clamp_min_(tiny).mul_(inside)
            elif payload.mode == "sign":
                positive = torch.clamp_min(x, tiny, out=scratch.get("rank", x.shape, x.dtype)).mul_(inside)
                x.clamp_max_(0).mul_(inside.neg_().add_(1)).add_(positive)
            else:
                assert payload.bounds is not None
                lo, hi = payload.bounds
                above = unpack_bits(payload.masks[1][b0:b1], x.numel(), scratch=scratch, name="equal")
                x.clamp_(_step_towards(lo, hi, x.dtype), _step_towards(hi, lo, x.dtype))
                x.masked_fill_(first, lo).masked_fill_(above, hi)

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
