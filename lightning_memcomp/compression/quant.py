"""``quant``: k-bit per-group quantization of saved activations (ActNN-style, with exact routing).

What autograd saves for backward is split, in memory order, into groups of ``group_size`` elements.
Each group keeps its minimum ``lo`` and step ``step = (max - lo) / (2**bits - 1)`` as fp16 numbers
relative to a per-group power-of-two exponent (5 bytes per group, no overflow for any fp32 value), and
every element becomes the code ``q = round((x - lo) / step)`` in ``bits`` bits, packed into ``uint8``.
Decoding returns ``lo + q * step``. This is the per-group min/scale quantizer of ActNN (Chen et al.,
ICML 2021) and the k-bit storage of BLPA (Chakrabarti & Moseley, NeurIPS 2019, Sec. 3), with:

* stochastic rounding ``q = floor((x - lo) / step + u)``, ``u ~ U[0, 1)``, by default for ``bits <= 4``,
  which keeps the decoded activation unbiased (``E[x_hat] = x``), hence the weight gradient too
  (``lo`` is rounded down and ``step`` up, so no value is clamped at the grid's ends);
* exact zeros and exact ReLU masks, unbiased: a group whose minimum is ``0`` keeps code 0 for an exact
  zero and spreads its other codes from its smallest positive value to its maximum, so zeros stay
  zeros, positives stay positive (the mask a ReLU's backward reads from its own output is exact at
  every bit width) and the positives are still rounded without bias (at 1 bit they decode to the
  group's mean positive value);
* constant groups (a dead channel, padding) keep their value's exact bits; a tensor holding NaN or Inf
  is left as it is (the engine counts it as passthrough); float64 tensors keep float32 offsets with a
  16-bit exponent, so no magnitude overflows or flushes to zero;
* a 1-bit mask stored beside the codes where a backward tests the saved tensor against thresholds
  that are not a group minimum (LeakyReLU/PReLU/ELU: ``x > 0``; ReLU6/Hardtanh: ``min < x < max``);
* max-pool indices kept exact in the narrowest integer type, dropout masks at one bit per element;
* normalization statistics and other 0-/1-D tensors are never taken (they stay exact).

The encode and decode have fused implementations, chosen by :mod:`lightning_memcomp.kernels`
(``MEMCOMP_KERNELS``) for float32/float16/bfloat16 tensors: C++ for CPU tensors (``cuda/codecs_cpu.cpp``,
no full-size temporary: statistics group by group, codes packed straight into the payload, random numbers
from a counter-based hash) and CUDA for CUDA tensors (``cuda/quant_pack.cu``). The torch path here is the
reference (``MEMCOMP_KERNELS=torch``); the kernels give its bits for deterministic rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    mask_chunks,
    pack_bits,
    pack_predicate,
    unpack_bits,
    unpack_mask_piece,
)
from lightning_memcomp.kernels import triton_failed, use_cpu_kernel, use_cuda_kernel, use_triton_kernel
from lightning_memcomp.memory.engine import Codec, SaveContext, mix_seed

__all__ = ["QuantCodec", "QuantPayload", "dequantize_groups", "quantize_groups"]

KERNEL = "quant_pack"
CPU_KERNEL = "codecs_cpu"
TRITON_KERNEL = "quant_triton"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# backward reads the saved tensor only through "x > 0" (sign) or "min < x < max" (hardtanh)
_SIGN_TYPES: tuple[type[nn.Module], ...] = (nn.LeakyReLU, nn.PReLU, nn.ELU, nn.RReLU)
_HARDTANH_TYPES: tuple[type[nn.Module], ...] = (nn.Hardtanh,)  # nn.ReLU6 is a Hardtanh


@dataclass
class QuantPayload:
    """A quantized tensor: packed codes, per-group fp16 ``lo``/``step`` with an int8 exponent each."""

    codes: Tensor  # uint8 [G, group_size * bits / 8]
    lo: Tensor  # float16 [G] (float32 for float64 tensors), relative to 2**exponent; see _quantize_chunk
    step: Tensor  # float16 [G] (float32), negative for a zero-based group
    exponent: Tensor  # int8 [G] (int16); its smallest value marks a constant group (exact bits in lo/step)
    mask: BitMask | None  # extra routing bit per element, see _mask_kind
    bits: int
    numel: int
    shape: tuple[int, ...]
    order: tuple[int, ...] | None
    dtype: torch.dtype
    mask_kind: str | None = None
    mask_bounds: tuple[float, float] | None = None


def _grouped(flat: Tensor, group_size: int) -> Tensor:
    pad = (-flat.numel()) % group_size
    if pad:
        # replicate the last element: padding never widens the last group's range
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, group_size)


def _meta_types(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype, torch.dtype, int]:
    """(work dtype, lo/step dtype, exponent dtype, largest exponent) for saved tensors of ``dtype``."""
    if dtype == torch.float64:
        return torch.float64, torch.float32, torch.int16, 1021
    return torch.float32, torch.float16, torch.int8, 127


def _smallest_positive(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The smallest positive (subnormal) value of ``dtype``, as a 0-d tensor on ``device``."""
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.nextafter(zero, torch.ones_like(zero))


def _round_to(values: Tensor, dtype: torch.dtype, direction: float) -> Tensor:
    """``values`` rounded to ``dtype`` towards ``direction`` (``-inf`` down, ``+inf`` up)."""
    rounded = values.to(dtype)
    toward = torch.full_like(rounded, direction)
    off = rounded.to(values.dtype) > values if direction < 0 else rounded.to(values.dtype) < values
    return torch.where(off, torch.nextafter(rounded, toward), rounded)


def _split_bits(values: Tensor, meta: torch.dtype) -> tuple[Tensor, Tensor]:
    """The bits of ``values`` (float32/float64) as two halves viewed as ``meta`` (float16/float32)."""
    half = 16 if meta == torch.float16 else 32
    ints = torch.int16 if meta == torch.float16 else torch.int32
    wide = values.view(torch.int32 if half == 16 else torch.int64).to(torch.int64)
    high = (wide >> half).to(ints)
    low = (wide & ((1 << half) - 1))
    low = torch.where(low >= (1 << (half - 1)), low - (1 << half), low).to(ints)
    return high.view(meta), low.view(meta)


def _join_bits(high: Tensor, low: Tensor, work: torch.dtype) -> Tensor:
    """Inverse of :func:`_split_bits`."""
    half = 16 if high.dtype == torch.float16 else 32
    ints = torch.int16 if half == 16 else torch.int32
    wide = (high.view(ints).to(torch.int64) << half) | (low.view(ints).to(torch.int64) & ((1 << half) - 1))
    if half == 16:
        wide = torch.where(wide >= (1 << 31), wide - (1 << 32), wide).to(torch.int32)
    return wide.view(work)


#: work per chunk of the torch path: temporaries never exceed a few times this, whatever the tensor's size
CHUNK_BYTES = 4 << 20


def _rows_per_chunk(group_size: int) -> int:
    return max(1, CHUNK_BYTES // (group_size * 4))


def _empty_payload(groups: int, group_size: int, bits: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _, meta, exp_dtype, _ = _meta_types(dtype)
    return (torch.empty(groups, group_size * bits // 8, dtype=torch.uint8, device=device),
            torch.empty(groups, dtype=meta, device=device), torch.empty(groups, dtype=meta, device=device),
            torch.empty(groups, dtype=exp_dtype, device=device))


def quantize_into(groups: Tensor, bits: int, stochastic: bool, generator: torch.Generator | None,
                  out: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
    """:func:`quantize_groups` written into ``out`` chunk by chunk (bounded temporaries); returns a device
    boolean that is ``True`` when every group was finite (no host sync here)."""
    rows = _rows_per_chunk(groups.shape[1])
    finite = torch.ones((), dtype=torch.bool, device=groups.device)
    for start in range(0, groups.shape[0], rows):
        part = _quantize_chunk(groups[start:start + rows], bits, stochastic, generator)
        for target, value in zip(out, part[:4]):
            target[start:start + rows] = value
        finite &= part[4]
    return finite


def quantize_groups(
    groups: Tensor, bits: int, stochastic: bool, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Reference per-group quantizer: ``[G, S]`` floats -> (codes ``uint8 [G, S*bits/8]``, lo, step, exponent).

    Works through the groups in chunks of :data:`CHUNK_BYTES`, so its temporaries stay bounded.
    Returns ``None`` when a group holds NaN or Inf. See :func:`_quantize_chunk` for the format.
    """
    out = _empty_payload(groups.shape[0], groups.shape[1], bits, groups.dtype, groups.device)
    if not bool(quantize_into(groups, bits, stochastic, generator, out)):
        return None
    return out


def _quantize_chunk(
    groups: Tensor, bits: int, stochastic: bool, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Quantize ``[g, S]`` groups: (codes ``uint8 [g, S*bits/8]``, lo, step, exponent, all-finite flag).

    The flag is a 0-d device boolean, ``False`` when a group holds NaN or Inf. ``lo`` and
    ``step`` are stored relative to ``2**exponent`` (the exponent of the group's largest magnitude), as
    float16 with an int8 exponent (float32 with an int16 exponent for float64 tensors). Three kinds of
    group:

    * ordinary: ``lo`` rounded down, ``step`` rounded up, so every value lies on the grid
      ``(lo + q * step) * 2**exponent``, ``q = 0 .. 2**bits - 1``, and stochastic rounding is unbiased;
    * zero-based (minimum exactly 0, e.g. a ReLU output), flagged by a negative ``step``: code 0 is an
      exact zero and codes ``1 .. 2**bits - 1`` cover ``[lo, lo + (2**bits - 2) * |step|]`` from the smallest
      positive value up: zeros stay zeros, positives stay positive, and stochastic rounding of the positives
      is unbiased (at 1 bit a positive decodes to the group's mean positive value);
    * constant (all values equal), flagged by the smallest exponent: the value's exact bits are split
      over ``lo`` and ``step``, so it decodes exactly.
    """
    work, meta, exp_dtype, emax = _meta_types(groups.dtype)
    x = groups.to(work)
    levels = (1 << bits) - 1
    mn, mx = torch.aminmax(x, dim=1)
    finite = (torch.isfinite(mn) & torch.isfinite(mx)).all()
    mn = torch.where(torch.isfinite(mn), mn, torch.zeros_like(mn))  # the flag rejects the result anyway
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    amax = torch.maximum(mn.abs(), mx.abs())
    exponent = torch.frexp(amax).exponent.clamp(-emax, emax)
    inv_scale = torch.ldexp(torch.ones_like(amax), -exponent)
    constant = mn == mx
    zero_based = (mn == 0) & (mx > 0)
    smallest = _smallest_positive(meta, x.device)
    zrows = _rows(zero_based)
    low = mn.clone()
    positive = None
    if zrows is not None:  # the smallest (at 1 bit the mean) positive value of zero-based groups
        xz = x[zrows]
        positive = xz > 0
        if bits > 1:
            low[zrows] = torch.where(positive, xz, xz.new_full((), float("inf"))).amin(1)
        else:
            low[zrows] = torch.where(positive, xz, xz.new_zeros(())).sum(1) / positive.sum(1).clamp(min=1)
        del xz
    low = low * inv_scale
    lo = _round_to(low, meta, float("-inf"))
    if bits == 1:
        lo = torch.where(zero_based, low.to(meta), lo)  # the mean positive value, to nearest
    lo = torch.where((low > 0) & (lo == 0), smallest, lo)  # a positive minimum keeps a positive grid
    span = mx * inv_scale - lo.to(work)
    steps = torch.where(zero_based, torch.full_like(span, max(levels - 1, 1)), torch.full_like(span, levels))
    step = _round_to(span / steps, meta, float("inf"))
    if bits == 1:
        step = torch.where(zero_based, torch.zeros_like(step), step)
    lo_f = lo.to(work).unsqueeze(1)
    step_f = torch.where(step > 0, step, torch.ones_like(step)).to(work).unsqueeze(1)
    v = x * inv_scale.unsqueeze(1)  # the one full-size float temporary (plus the random draws)
    v.sub_(lo_f).div_(step_f)
    if stochastic:
        v.add_(torch.rand(v.shape, device=v.device, dtype=work, generator=generator)).floor_()
    else:
        v.round_()
    v.clamp_(0, levels)
    if zrows is not None:  # zero-based: 0 for zeros, 1 .. levels for positives
        vz = v[zrows]
        if bits == 1:
            vz.fill_(1)
        else:
            vz.clamp_(max=levels - 1).add_(1)
        vz.masked_fill_(~positive, 0)
        if not isinstance(zrows, slice):
            v[zrows] = vz
    crows = _rows(constant)
    if crows is not None:
        v[crows] = 0
    codes = pack_bits(v.to(torch.uint8), bits)
    # the flags: a negative step marks a zero-based group, the smallest exponent a constant one
    step = torch.where(zero_based, -step, step)
    high, low_bits = _split_bits(mn, meta)
    lo = torch.where(constant, high, lo)
    step = torch.where(constant, low_bits, step)
    sentinel = torch.iinfo(exp_dtype).min
    exponent = torch.where(constant, torch.full_like(exponent, sentinel), exponent).to(exp_dtype)
    return codes, lo, step, exponent, finite


def _rows(mask: Tensor) -> Tensor | slice | None:
    """The rows where ``mask`` holds: ``None`` (none), ``slice(None)`` (all: views, no copies) or indices."""
    count = int(mask.sum())
    if count == 0:
        return None
    if count == mask.numel():
        return slice(None)
    return mask.nonzero().squeeze(1)


def dequantize_groups(
    codes: Tensor, lo: Tensor, step: Tensor, exponent: Tensor, bits: int, dtype: torch.dtype,
    out: Tensor | None = None,
) -> Tensor:
    """Reference inverse of :func:`quantize_groups`: ``[G, S]`` of ``dtype``, finite, within the dtype's range.

    Decodes chunk by chunk straight into ``out`` (allocated if not given): the one full-size tensor.
    """
    group_size = codes.shape[1] * 8 // bits
    if out is None:
        out = torch.empty(codes.shape[0], group_size, dtype=dtype, device=codes.device)
    rows = _rows_per_chunk(group_size)
    for start in range(0, codes.shape[0], rows):
        end = start + rows
        out[start:end] = _dequantize_chunk(codes[start:end], lo[start:end], step[start:end],
                                           exponent[start:end], bits, dtype)
    return out


def _dequantize_chunk(
    codes: Tensor, lo: Tensor, step: Tensor, exponent: Tensor, bits: int, dtype: torch.dtype
) -> Tensor:
    work, _, exp_dtype, _ = _meta_types(dtype)
    q = unpack_bits(codes, bits).to(work)  # the one full-size float temporary, decoded in place
    constant = exponent == torch.iinfo(exp_dtype).min
    zero_based = torch.signbit(step) & ~constant
    scale = torch.ldexp(torch.ones(exponent.shape, dtype=work, device=codes.device),
                        torch.where(constant, 0, exponent.to(torch.int32))).unsqueeze(1)
    lo_f = lo.to(work).unsqueeze(1)
    step_f = step.to(work).abs().unsqueeze(1)
    zrows = _rows(zero_based)
    zeros = None
    if zrows is not None:  # zero-based groups: code 0 is an exact zero, code k >= 1 grid point k - 1
        qz = q[zrows]
        zeros = qz == 0
        qz.sub_(1)
        if not isinstance(zrows, slice):
            q[zrows] = qz
    x = q.mul_(step_f).add_(lo_f).mul_(scale)
    finfo = torch.finfo(dtype)
    # also for float32: lo rounded down can reach -2**128 in a group holding -finfo.max, which is -inf
    x.clamp_(-finfo.max, finfo.max)
    # positives stay positive in a narrow dtype (exact ReLU masks)
    smallest = _smallest_positive(dtype, codes.device).to(work)
    if zrows is not None:
        xz = x[zrows]
        xz.clamp_(min=smallest).masked_fill_(zeros, 0)
        if not isinstance(zrows, slice):
            x[zrows] = xz
    prows = _rows(~zero_based & ~constant & (lo_f.squeeze(1) > 0))
    if prows is not None:
        if isinstance(prows, slice):
            x.clamp_(min=smallest)
        else:
            x[prows] = x[prows].clamp(min=smallest)
    crows = _rows(constant)
    if crows is not None:
        x[crows] = _join_bits(lo, step, work)[crows].unsqueeze(1)
    return x.to(dtype)


class QuantCodec(Codec):
    """k-bit per-group quantization with stochastic rounding and exact gradient routing.

    Args:
        bits: bits per stored element: 1, 2, 4 or 8 (fp32 -> 32 / bits times smaller, plus 5 bytes
            of metadata per group).
        group_size: elements per group sharing one ``lo``/``step`` (a multiple of 32, 32 to 65536).
            Larger groups: less metadata, coarser steps.
        stochastic: stochastic (unbiased) rounding; default ``True`` for ``bits <= 2``, nearest rounding at 4 and
            8 bits (at 4 bits, nearest rounding gives the closer gradient: parameter-gradient cosine 0.993 against
            0.985 on EfficientNet-B0, 0.996 against 0.992 on MobileNetV3, ``benchmarks/zoo_coverage.py``).
        seed: seed of the codec's own random stream (the global RNG is never consumed); default:
            derived from ``torch.initial_seed()``, so ``torch.manual_seed`` makes runs repeatable.
        exact_routing: keep max-pool indices, dropout masks and activation masks exact (default);
            ``False`` quantizes only floating tensors and passes the rest through untouched.
        input_bits: bits for saved tensors that do not require grad, i.e. the network's input data
            that the first layer saves for its weight gradient (default 8: coarse input data dominates
            the first layer's gradient error; ``None`` keeps it exact).

    Example::

        with compress_activations(model, codec="quant", bits=2, group_size=512) as ledger:
            loss = model(x).sum()
        loss.backward()
    """

    name = "quant"
    compresses = True

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 256,
        stochastic: bool | None = None,
        seed: int | None = None,
        exact_routing: bool = True,
        input_bits: int | None = 8,
    ) -> None:
        self.bits = check_bits(bits)
        self.input_bits = None if input_bits is None else check_bits(input_bits, "input_bits")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size % 32 or not (
            32 <= group_size <= 65536
        ):
            raise ValueError(f"group_size={group_size!r} is not allowed; use a multiple of 32 from 32 to 65536")
        if stochastic is not None and not isinstance(stochastic, bool):
            raise ValueError(f"stochastic={stochastic!r} is not allowed; use True, False or None (auto)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed={seed!r} is not allowed; use an int or None")
        self.group_size = group_size
        self.stochastic = self.bits <= 2 if stochastic is None else stochastic
        self._stochastic_option = stochastic
        self.seed = seed
        self.exact_routing = bool(exact_routing)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._stream_seed: int | None = None

    def __repr__(self) -> str:
        return (f"QuantCodec(bits={self.bits}, group_size={self.group_size}, stochastic={self.stochastic}, "
                f"exact_routing={self.exact_routing}, input_bits={self.input_bits})")

    # -- what is taken -------------------------------------------------------------------------
    def accepts(self, tensor: Tensor, ctx: SaveContext) -> bool:
        if self.exact_routing and is_routing_tensor(tensor, ctx.module):
            return True
        # 0-/1-D tensors are normalization statistics, biases or scalars: kept exact
        if not (tensor.is_floating_point() and tensor.dim() >= 2):
            return False
        bits = self.bits if tensor.requires_grad else (self.input_bits or 8)
        groups = -(-tensor.numel() // self.group_size)
        meta = 11 if tensor.dtype == torch.float64 else 5
        return groups * (self.group_size * bits // 8 + meta) < tensor.numel() * tensor.element_size()

    # -- random stream ---------------------------------------------------------------------------
    def reseed(self, seed: int, step: int = 0) -> None:
        """Restart the random stream from ``(seed, step)``; the engine calls this at every start with its
        base seed (``torch.initial_seed()`` unless given) and step. The codec's own ``seed``, if given,
        replaces the base seed."""
        self._stream_seed = mix_seed(self.seed if self.seed is not None else seed, step)
        self._generators.clear()

    def generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._stream_seed is not None:
                seed = self._stream_seed
            elif self.seed is not None:
                seed = self.seed
            else:
                seed = torch.initial_seed() + 0x5EED
            gen.manual_seed(seed % (2**63))
            self._generators[device] = gen
        return gen

    # -- encode / decode -------------------------------------------------------------------------
    def encode(self, tensor: Tensor, ctx: SaveContext) -> Any:
        module = ctx.module
        if self.exact_routing and is_routing_tensor(tensor, module):
            routed = encode_routing(tensor.detach())
            if routed is not None:
                return routed
            if not tensor.is_floating_point():
                return tensor
        bits, stochastic = self.bits, self.stochastic
        if not tensor.requires_grad:
            if self.input_bits is None:
                return tensor
            bits = self.input_bits
            stochastic = bits <= 4 if self._stochastic_option is None else self._stochastic_option
        x = tensor.detach()
        flat, order = memory_order(x)
        quantized = self._quantize(flat, bits, stochastic)
        if quantized is None:
            return tensor  # NaN or Inf: kept as it is (the engine counts it as passthrough)
        codes, lo, step, exponent = quantized
        mask, kind, bounds = None, None, None
        if self.exact_routing and isinstance(module, _SIGN_TYPES):
            kind = "sign"
            mask = threshold_mask(flat, 0.0, float("inf"))
        elif self.exact_routing and isinstance(module, _HARDTANH_TYPES):
            kind = "hardtanh"
            bounds = (float(module.min_val), float(module.max_val))
            mask = threshold_mask(flat, *bounds)
        return QuantPayload(codes, lo, step, exponent, mask, bits, flat.numel(), tuple(x.shape), order,
                            x.dtype, kind, bounds)

    def _quantize(self, flat: Tensor, bits: int, stochastic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """Quantize a flat tensor in groups of ``group_size`` (the last one padded by its last value)."""
        size = self.group_size
        full, rest = divmod(flat.numel(), size)
        cpu, cuda = _kernels(flat)
        if cpu is not None or cuda:
            seed = 0
            if stochastic:
                seed = int(torch.randint(0, 2**62, (1,), generator=self.generator(torch.device("cpu"))))
            if cpu is not None:  # the last, partial group is padded inside the kernel: no copy of the tensor
                packed = cpu.pack_flat(flat, size, bits, stochastic, seed)
            else:
                packed = _cuda_call(flat, "pack", _grouped(flat, size).contiguous(), bits, stochastic, seed)
            if packed is not None:
                codes, lo, step, exponent, finite = packed
                return (codes, lo, step, exponent) if bool(finite) else None
        gen = self.generator(flat.device) if stochastic else None
        out = _empty_payload(full + (1 if rest else 0), size, bits, flat.dtype, flat.device)
        # the full groups are a view of the tensor; only the last, partial group is copied and padded
        finite = quantize_into(flat[: full * size].view(full, size), bits, stochastic, gen,
                               tuple(o[:full] for o in out))
        if rest:
            finite &= quantize_into(_grouped(flat[full * size:], size), bits, stochastic, gen,
                                    tuple(o[full:] for o in out))
        return out if bool(finite) else None

    def decode(self, payload: Any) -> Tensor:
        if not isinstance(payload, QuantPayload):
            return decode_routing(payload) if not isinstance(payload, Tensor) else payload
        cpu, cuda = _kernels(payload.codes, payload.dtype)
        args = (payload.codes, payload.lo, payload.step, payload.exponent, payload.bits, payload.dtype)
        groups = cpu.unpack(*args) if cpu is not None else _cuda_call(payload.codes, "unpack", *args) if cuda else None
        if groups is None:
            groups = dequantize_groups(payload.codes, payload.lo, payload.step, payload.exponent, payload.bits,
                                       payload.dtype)
        flat = groups.reshape(-1)[: payload.numel]
        if payload.mask is not None:
            flat = _apply_mask(flat, payload.mask.bits, payload.mask_kind,
                               payload.mask_bounds)
        return from_memory_order(flat, payload.shape, payload.order)

    def decode_batch(self, payload: Any, start: int, stop: int) -> Tensor | None:
        """Rows ``start:stop`` decoded from the groups that hold them (at most two groups beyond them)."""
        span = batch_range(payload, start, stop) if isinstance(payload, QuantPayload) else None
        if span is None:
            return None
        first, last, shape = span
        size = payload.codes.shape[-1] * 8 // payload.bits
        g0, g1 = first // size, -(-last // size)
        part = QuantPayload(payload.codes[g0:g1], payload.lo[g0:g1], payload.step[g0:g1], payload.exponent[g0:g1],
                            None, payload.bits, (g1 - g0) * size, ((g1 - g0) * size,), None, payload.dtype)
        flat = self.decode(part)[first - g0 * size: last - g0 * size]
        return from_memory_order(flat, shape, payload.order)


def batch_range(payload: Any, start: int, stop: int) -> tuple[int, int, tuple[int, ...]] | None:
    """Flat memory-order range ``[first, last)`` holding rows ``start:stop`` of a payload's first dimension, and
    the shape of those rows; ``None`` when the rows are not contiguous in memory order (a layout whose
    outermost dimension is not the batch) or a routing mask rides along."""
    if getattr(payload, "mask", None) is not None or not payload.shape:
        return None
    if payload.order is not None and payload.order[0] != 0:
        return None
    per = payload.numel // payload.shape[0] if payload.shape[0] else 0
    return start * per, stop * per, (stop - start, *payload.shape[1:])


def _kernels(tensor: Tensor, dtype: torch.dtype | None = None) -> tuple[Any, bool]:
    """(C++ extension or ``None``, whether a CUDA kernel may serve) for ``tensor`` of (decoded) ``dtype``;
    ``(None, False)``: the torch path."""
    if (dtype or tensor.dtype) not in _KERNEL_DTYPES:
        return None, False
    if tensor.is_cuda:
        return None, True
    return use_cpu_kernel(CPU_KERNEL, tensor), False


def _cuda_call(tensor: Tensor, op: str, *args: Any) -> Any:
    """``op`` ("pack" or "unpack", one signature for both) of the first CUDA kernel that works for ``tensor``:
    Triton, then the nvcc-built extension (see :mod:`lightning_memcomp.kernels`); ``None``: the torch path."""
    triton_module = use_triton_kernel(TRITON_KERNEL, tensor)
    if triton_module is not None:
        try:
            return getattr(triton_module, op)(*args)
        except Exception as err:  # noqa: BLE001 - a compilation failure falls back (auto) or raises (forced)
            triton_failed(TRITON_KERNEL, err)
    ext = use_cuda_kernel(KERNEL, tensor)
    return None if ext is None else getattr(ext, op)(*args)


def threshold_mask(flat: Tensor, low: float, high: float) -> BitMask:
    """The 1-bit mask ``low < flat < high`` (the thresholds as ``flat``'s dtype compares them), packed; fused
    in the C++ kernel for CPU tensors (no boolean temporary)."""
    cpu, _ = _kernels(flat)
    if cpu is None:
        def inside(piece: Tensor) -> Tensor:
            above = piece > low
            return above & (piece < high) if high != float("inf") else above

        return BitMask(pack_predicate(flat, inside), flat.numel())
    # torch compares with a Python float in the tensor's dtype: the thresholds rounded to it
    bounds = torch.tensor([low, high], dtype=torch.float64).to(flat.dtype).double().tolist()
    return BitMask(cpu.threshold_mask(flat, *bounds), flat.numel())


def _apply_mask(flat: Tensor, bits: Tensor, kind: str | None, bounds: tuple[float, float] | None) -> Tensor:
    """Force the decoded values (``flat``, written in place) onto the right side of the thresholds that the
    packed mask ``bits`` records, piece by piece (no full-size temporary)."""
    dtype = flat.dtype
    if kind == "sign":
        tiny = torch.finfo(dtype).tiny

        def fix(piece: Tensor, mask: Tensor) -> Tensor:
            return torch.where(mask, piece.clamp(min=tiny), piece.clamp(max=0))
    elif kind == "hardtanh" and bounds is not None:
        low = torch.tensor(bounds[0], dtype=dtype, device=flat.device)
        high = torch.tensor(bounds[1], dtype=dtype, device=flat.device)
        inside_low = torch.nextafter(low, high)
        inside_high = torch.nextafter(high, low)

        def fix(piece: Tensor, mask: Tensor) -> Tensor:
            inside = torch.minimum(torch.maximum(piece, inside_low), inside_high)
            outside = torch.where(piece < (low + high) / 2, low, high)
            return torch.where(mask, inside, outside)
    else:
        return flat
    for start, stop in mask_chunks(flat.numel()):
        piece = flat[start:stop]
        piece.copy_(fix(piece, unpack_mask_piece(bits, start, stop)))
    return flat
