"""``blpa``: the quantizer of "Backprop with Approximate Activations" (Chakrabarti & Moseley, NeurIPS 2019).

The paper (Sec. 3.2) keeps, for backward, each layer's input quantized per channel into ``n = 2**bits``
bins of width ``delta = window * sigma / n`` -- a window of about ``window = 6`` batch standard deviations
-- with the bin edges placed so that the threshold of the ReLU that follows falls exactly on a bin
boundary: the ReLU mask recovered in backward is then exact. Values are floored into their bin and
reconstructed at the bin centre. Here, per channel ``c`` with batch mean ``mu`` and std ``sigma``:

* ``t`` is the threshold: ``0`` for a ReLU/LeakyReLU's saved tensor; for a batch norm's input
  ``mu - (beta / gamma) * sqrt(var + eps)`` (where ``gamma * x_hat + beta`` crosses zero, the following
  ReLU's threshold); otherwise the channel mean (a plain centred window);
* ``s`` bins lie below ``t``: ``round((t - mu) / delta + n / 2)``, i.e. the window is centred on the
  mean, **clamped to** ``[1, n - 1]``. The original computes ``max(1, n/2 - floor(bias * n / 6))``
  without the upper clamp: when ``beta / gamma`` is very negative every value lands below the
  threshold's bin and the recovered mask is all zero, silently killing the gradients. With the clamp
  values above ``t`` always get a code ``>= s`` (see ``tests/test_blpa_codec.py``);
* a ReLU's saved output is non-negative and every value below ``t = 0`` is exactly zero, so one bin
  below the threshold suffices there (``s = 1``) and the decoded value is passed through the ReLU;
* code ``k = ceil((x - t) / delta) - 1 + s`` clamped to ``[0, n - 1]`` (bins are ``(edge, edge + delta]``,
  so ``x == t`` stays below the threshold, as ``relu`` has it), decoded as ``t + (k - s + 1/2) * delta``.

Codes are bit-packed (two 4-bit codes per byte, as in the paper). Max-pool indices, dropout masks and
the pass mask of ReLU6/Hardtanh stay exact as in the ``quant`` codec; normalization statistics and
other 0-/1-D tensors are never taken.

For CPU tensors (float32/float16/bfloat16) the statistics, the codes and the decoding run in the C++ kernel
``cuda/codecs_cpu.cpp`` when :mod:`lightning_memcomp.kernels` selects it (``MEMCOMP_KERNELS``): one pass for
the statistics, one writing the packed codes, one writing the decoded tensor, no full-size temporary. The
per-channel threshold, bin width and shift are computed here from those statistics either way (``_bins``);
given them, the kernel's codes and decoded values are the torch path's bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_memcomp.compression.bitpack import (
    BitMask,
    check_bits,
    decode_routing,
    encode_routing,
    from_memory_order,
    is_routing_tensor,
    memory_order,
    pack_bits,
    unpack_bits,
)
from lightning_memcomp.compression.quant import (
    CHUNK_BYTES,
    _HARDTANH_TYPES,
    _apply_mask,
    _kernels,
    _smallest_positive,
    batch_range,
    threshold_mask,
)
from lightning_memcomp.memory.engine import Codec, SaveContext

__all__ = ["BLPACodec", "BLPAPayload", "blpa_dequantize", "blpa_quantize"]

# saved tensors whose backward reads the sign only (ReLU output, LeakyReLU/PReLU/ELU input or output)
_RELU_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU,)
_SIGN_TYPES: tuple[type[nn.Module], ...] = (nn.LeakyReLU, nn.PReLU, nn.ELU, nn.RReLU)


@dataclass
class BLPAPayload:
    """Per-channel BLPA codes: packed bins plus the threshold, bin width and bins below it per channel."""

    codes: Tensor  # uint8, flat, bins packed 8 / bits per byte
    threshold: Tensor  # float32 [C]
    delta: Tensor  # float32 [C]
    shift: Tensor  # uint8 [C]
    bits: int
    numel: int
    shape: tuple[int, ...]
    order: tuple[int, ...] | None
    dtype: torch.dtype
    relu: bool
    mask: BitMask | None = None
    mask_bounds: tuple[float, float] | None = None


def _channel_view(v: Tensor, dim: int) -> Tensor:
    return v.view(1, -1, *([1] * (dim - 2)))


def blpa_quantize(
    x: Tensor, bits: int, threshold: Tensor | None, window: float = 6.0, relu: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """BLPA bins of ``x`` (``[N, C, ...]``) per channel: (codes uint8 like ``x``, threshold, delta, shift).

    ``threshold`` (``[C]``, the following ReLU's threshold) defaults to the channel mean; ``relu`` marks
    a ReLU's non-negative output (one bin below the threshold). A channel whose values are all equal
    (zero spread: a dead filter, a missing one-hot category, a batch of one) is stored exactly: its
    threshold is its value, its bin width 0 and its codes 0. Returns ``None`` when ``x`` holds NaN or
    Inf (or its spread overflows), so the caller keeps the tensor as it is.
    """
    n = 1 << bits
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = _rows_per_chunk(x)
    dims = [d for d in range(x.dim()) if d != 1]
    lo, hi = torch.amin(x, dim=dims).to(work), torch.amax(x, dim=dims).to(work)  # exact, no copy of x
    if not bool((torch.isfinite(lo) & torch.isfinite(hi)).all()):
        return None
    std, mu = _channel_std_mean(x, work, rows, torch.maximum(lo.abs(), hi.abs()))
    if not bool((torch.isfinite(std) & torch.isfinite(mu)).all()):
        return None
    t, delta, shift, safe, constant = _bins(lo, hi, std, mu, threshold, bits, window, relu)
    view = x.dim()
    t_v, safe_v = _channel_view(t, view), _channel_view(safe, view)
    offset_v, constant_v = _channel_view(shift - 1, view), _channel_view(constant, view)
    codes = torch.empty_like(x, dtype=torch.uint8)  # the layout of x
    shift_v = _channel_view(shift, view)
    for start in range(0, x.shape[0], rows):  # a few MiB of float temporaries at a time
        part = x[start:start + rows].to(work)
        k = (part - t_v).div_(safe_v).ceil_().add_(offset_v)
        # a value just above the threshold whose distance to it underflows (subnormal activations in a wide
        # channel) still takes the first bin above: the recovered mask stays exact
        k = torch.where(part > t_v, torch.maximum(k, shift_v), k)
        codes[start:start + rows] = k.masked_fill_(constant_v, 0).clamp_(0, n - 1)
    return codes, t, delta, shift.to(torch.uint8)


def _bins(
    lo: Tensor, hi: Tensor, std: Tensor, mu: Tensor, threshold: Tensor | None, bits: int, window: float, relu: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per channel, from its extremes, std and mean: (threshold ``t``, bin width ``delta``, bins below the
    threshold ``shift`` (float), the divisor ``safe`` (``delta``, 1 where 0), the constant-channel mask)."""
    n = 1 << bits
    constant = lo == hi  # the spread may be a rounding error above 0 for equal values
    # a channel that is not constant always keeps a positive bin width (else every value would decode to t)
    sigma = torch.where(std > 0, std, (hi - lo) / 2)
    zero = mu.new_zeros(())
    smallest = torch.nextafter(zero, zero + 1)
    delta = torch.where(constant, torch.zeros_like(sigma), (window * sigma / n).clamp(min=smallest))
    t = mu.clone() if threshold is None else threshold.to(mu.dtype)
    t = torch.where(constant, lo, t)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    if relu:
        shift = torch.ones_like(mu)
    else:
        # the window is centred on the mean; the clamp keeps at least one bin on each side of t
        shift = torch.round((t - mu) / safe + n / 2).clamp(1, n - 1)
    shift = torch.where(constant, torch.ones_like(shift), shift)
    return t, delta, shift, safe, constant


def _layout(shape: tuple[int, ...], order: tuple[int, ...] | None) -> tuple[int, int, int]:
    """A tensor of ``shape`` flattened by :func:`memory_order` (``order``) as ``[outer, channels, inner]``."""
    dims = list(order) if order is not None else list(range(len(shape)))
    position = dims.index(1)
    sizes = [shape[d] for d in dims]
    return math.prod(sizes[:position]), sizes[position], math.prod(sizes[position + 1:])


def _blpa_encode_cpu(
    ext: Any, x: Tensor, bits: int, threshold: Tensor | None, bn: nn.Module | None, window: float, relu: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[int, ...] | None] | None:
    """The C++ kernel's encode: (packed codes in memory order, threshold, delta, shift, order), ``None`` for a
    tensor holding NaN or Inf. The threshold of a batch norm's input comes from the kernel's statistics."""
    flat, order = memory_order(x)
    layout = _layout(tuple(x.shape), order)
    lo, hi, mu, std, finite = ext.blpa_stats(flat, *layout)
    if not bool(finite):
        return None
    if bn is not None:
        threshold = _bn_threshold(mu, std.square(), bn, x.shape[1])
    t, delta, shift, _, _ = _bins(lo, hi, std, mu, threshold, bits, window, relu)
    shift = shift.to(torch.uint8)
    return ext.blpa_pack(flat, t, delta, shift, *layout, bits), t, delta, shift, order


def _rows_per_chunk(x: Tensor) -> int:
    """Samples (first dimension) per chunk: about :data:`~lightning_memcomp.compression.quant.CHUNK_BYTES` of
    float32 work."""
    per_sample = max(1, x[0].numel() * 4)
    return max(1, CHUNK_BYTES // per_sample)


def _channel_std_mean(x: Tensor, work: torch.dtype, rows: int, amax: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel population standard deviation and mean over every dimension but 1, chunk by chunk along
    the first (Chan et al.'s pairwise combination), so a float16 tensor is never copied whole to float32.

    Each channel is scaled by a power of two that brings its largest magnitude near 1, so squares of tiny
    values (1e-30 in float32) do not underflow and those of huge ones do not overflow.
    """
    dims = [d for d in range(x.dim()) if d != 1]
    limit = 1021 if work == torch.float64 else 126
    exponent = torch.frexp(amax).exponent.clamp(-limit, limit)
    scale = torch.ldexp(torch.ones_like(amax), -exponent)
    scale_v = _channel_view(scale, x.dim())
    count, mean, m2 = 0, None, None
    for start in range(0, x.shape[0], rows):
        part = x[start:start + rows].to(work) * scale_v
        size = part.numel() // part.shape[1]
        var_b, mean_b = torch.var_mean(part, dim=dims, correction=0)
        if mean is None:
            count, mean, m2 = size, mean_b, var_b * size
            continue
        total = count + size
        diff = mean_b - mean
        mean = mean + diff * (size / total)
        m2 = m2 + var_b * size + diff * diff * (count * size / total)
        count = total
    return (m2 / count).sqrt() / scale, mean / scale


def blpa_dequantize(
    codes: Tensor, threshold: Tensor, delta: Tensor, shift: Tensor, relu: bool, dtype: torch.dtype
) -> Tensor:
    """Bin centres ``t + (k - s + 1/2) * delta``, passed through the ReLU for a ReLU's output; finite and within
    ``dtype``'s range (a channel of width 0 decodes to its exact value). Decoded chunk by chunk into the one
    output tensor."""
    out = torch.empty_like(codes, dtype=dtype)
    rows = _rows_per_chunk(codes)
    for start in range(0, codes.shape[0], rows):
        out[start:start + rows] = _dequantize_rows(codes[start:start + rows], threshold, delta, shift, relu, dtype)
    return out


def _dequantize_rows(
    codes: Tensor, threshold: Tensor, delta: Tensor, shift: Tensor, relu: bool, dtype: torch.dtype
) -> Tensor:
    view = codes.dim()
    work = threshold.dtype
    k = codes.to(work).sub_(_channel_view(shift.to(work), view) - 0.5)
    x = k * _channel_view(delta.to(work), view)
    x.add_(_channel_view(threshold, view))
    finfo = torch.finfo(dtype)
    x = x.clamp_(-finfo.max, finfo.max)
    if relu:
        x = x.clamp_(min=0)
        # a positive bin stays positive in a narrow dtype too (exact ReLU mask)
        smallest = _smallest_positive(dtype, codes.device).to(work)
        x = torch.where((k > 0) & (_channel_view(delta, view) > 0), x.clamp(min=smallest), x)
    return x.to(dtype)


def _relu_threshold(x: Tensor, bn: nn.modules.batchnorm._BatchNorm) -> Tensor | None:
    """Where ``gamma * (x - mu) / sqrt(var + eps) + beta`` crosses zero, per channel, from batch statistics."""
    if not _bn_usable(bn, x.shape[1]):
        return None
    xf = x.detach().float()
    dims = [d for d in range(x.dim()) if d != 1]
    var, mu = torch.var_mean(xf, dim=dims, correction=0)
    return _bn_threshold(mu, var, bn, x.shape[1])


def _bn_usable(bn: nn.Module, channels: int) -> bool:
    return bool(bn.affine and bn.weight is not None and bn.bias is not None and channels == bn.num_features)


def _bn_threshold(mu: Tensor, var: Tensor, bn: nn.Module, channels: int) -> Tensor | None:
    """The threshold of :func:`_relu_threshold` from the batch mean and (population) variance per channel."""
    if not _bn_usable(bn, channels):
        return None
    gamma = bn.weight.detach().float()
    beta = bn.bias.detach().float()
    ratio = torch.where(gamma != 0, beta / torch.where(gamma != 0, gamma, torch.ones_like(gamma)), torch.zeros_like(beta))
    return mu - ratio * torch.sqrt(var + bn.eps)


class BLPACodec(Codec):
    """The BLPA quantizer: per-channel bins over a ``window``-sigma range aligned on the ReLU threshold.

    Args:
        bits: bits per stored element, 1, 2, 4 or 8 (the paper uses 4 and 8).
        window: width of the quantization window in batch standard deviations (paper: 6).
        exact_routing: keep max-pool indices, dropout masks and ReLU6/Hardtanh masks exact (default).
        input_bits: bits for saved tensors that do not require grad (the network's input data);
            ``None`` keeps them exact.

    Example::

        with compress_activations(model, codec="blpa", bits=4) as ledger:
            loss = model(x).sum()
        loss.backward()
    """

    name = "blpa"
    compresses = True

    def __init__(self, bits: int = 4, window: float = 6.0, exact_routing: bool = True,
                 input_bits: int | None = 8) -> None:
        self.bits = check_bits(bits)
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not window > 0:
            raise ValueError(f"window={window!r} is not allowed; use a positive number of standard deviations")
        self.window = float(window)
        self.exact_routing = bool(exact_routing)
        self.input_bits = None if input_bits is None else check_bits(input_bits, "input_bits")

    def __repr__(self) -> str:
        return f"BLPACodec(bits={self.bits}, window={self.window}, input_bits={self.input_bits})"

    def accepts(self, tensor: Tensor, ctx: SaveContext) -> bool:
        if self.exact_routing and is_routing_tensor(tensor, ctx.module):
            return True
        if not (tensor.is_floating_point() and tensor.dim() >= 2):
            return False
        # never larger than the tensor: per channel a threshold, a bin width (4 or 8 bytes each), a shift
        bits = self.bits if tensor.requires_grad else (self.input_bits or 8)
        per_channel = 17 if tensor.dtype == torch.float64 else 9
        payload = -(-tensor.numel() * bits // 8) + tensor.shape[1] * per_channel
        return payload < tensor.numel() * tensor.element_size()

    def encode(self, tensor: Tensor, ctx: SaveContext) -> Any:
        module = ctx.module
        if self.exact_routing and is_routing_tensor(tensor, module):
            routed = encode_routing(tensor.detach())
            if routed is not None:
                return routed
            if not tensor.is_floating_point():
                return tensor
        bits = self.bits
        if not tensor.requires_grad:
            if self.input_bits is None:
                return tensor
            bits = self.input_bits
        x = tensor.detach()
        relu = isinstance(module, _RELU_TYPES)
        threshold: Tensor | None = None
        bn = module if isinstance(module, nn.modules.batchnorm._BatchNorm) else None
        if relu or isinstance(module, _SIGN_TYPES):
            threshold = torch.zeros(x.shape[1], device=x.device)
        mask, bounds = None, None
        if self.exact_routing and isinstance(module, _HARDTANH_TYPES):
            bounds = (float(module.min_val), float(module.max_val))
            mask = threshold_mask(memory_order(x)[0], *bounds)
        cpu, _ = _kernels(x)
        if cpu is not None:
            encoded = _blpa_encode_cpu(cpu, x, bits, threshold, bn, self.window, relu)
            if encoded is None:
                return tensor  # NaN or Inf: kept as it is (the engine counts it as passthrough)
            packed, t, delta, shift, order = encoded
            return BLPAPayload(packed, t, delta, shift, bits, x.numel(), tuple(x.shape), order, x.dtype, relu,
                               mask, bounds)
        if bn is not None:
            threshold = _relu_threshold(x, bn)
        quantized = blpa_quantize(x, bits, threshold, self.window, relu=relu)
        if quantized is None:
            return tensor  # NaN or Inf: kept as it is (the engine counts it as passthrough)
        codes, t, delta, shift = quantized
        flat, order = memory_order(codes)
        per = 8 // bits
        pad = (-flat.numel()) % per
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        packed = pack_bits(flat.view(-1, per), bits).reshape(-1)
        return BLPAPayload(packed, t, delta, shift, bits, codes.numel(), tuple(x.shape), order, x.dtype, relu,
                           mask, bounds)

    def decode(self, payload: Any) -> Tensor:
        if not isinstance(payload, BLPAPayload):
            return decode_routing(payload) if not isinstance(payload, Tensor) else payload
        cpu, _ = _kernels(payload.codes, payload.dtype)
        if cpu is not None:  # decoded straight into the one output tensor
            flat = cpu.blpa_unpack(payload.codes, payload.threshold, payload.delta, payload.shift, payload.relu,
                                   payload.dtype, *_layout(payload.shape, payload.order), payload.bits)
            x = from_memory_order(flat, payload.shape, payload.order)
        else:
            flat = unpack_bits(payload.codes.view(-1, 1), payload.bits).reshape(-1)[: payload.numel]
            codes = from_memory_order(flat, payload.shape, payload.order)
            x = blpa_dequantize(codes, payload.threshold, payload.delta, payload.shift, payload.relu, payload.dtype)
        if payload.mask is not None:
            flat_x, order = memory_order(x)
            flat_x = _apply_mask(flat_x, payload.mask.bits, "hardtanh",
                                 payload.mask_bounds)
            x = from_memory_order(flat_x, payload.shape, order)
        return x

    def decode_batch(self, payload: Any, start: int, stop: int) -> Tensor | None:
        """Rows ``start:stop`` decoded from their own codes (the per-channel parameters are shared)."""
        span = batch_range(payload, start, stop) if isinstance(payload, BLPAPayload) else None
        if span is None or (span[0] * payload.bits) % 8 or (span[1] * payload.bits) % 8:
            return None
        first, last, shape = span
        part = replace(payload, codes=payload.codes.reshape(-1)[first * payload.bits // 8: last * payload.bits // 8],
                       numel=last - first, shape=shape)
        return self.decode(part)
