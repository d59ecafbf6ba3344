"""``quant``: k-bit per-group quantization of saved activations (ActNN-style, with exact routing).

What autograd saves for backward is split, in memory order, into groups of ``group_size`` elements.
Each group keeps its minimum ``lo`` and step ``step = (max - lo) / (2**bits - 1)`` as fp16 numbers
relative to a per-group power-of-two exponent (5 bytes per group, no overflow for any fp32 value), and
every element becomes the code ``q = round((x - lo) / step)`` in ``bits`` bits, packed into ``uint8``.
Decoding returns ``lo + q * step``. This is the per-group min/scale quantizer of ActNN (Chen et al.,
ICML 2021) and the k-bit storage of BLPA (Chakrabarti & Moseley, NeurIPS 2019, Sec. 3), with:

* stochastic rounding ``q = floor((x - lo) / step + u)``, ``u ~ U[0, 1)``, by default for ``bits <= 4``,
  which keeps the decoded activation unbiased (``E[x_hat] = x``), hence the weight gradient too;
* exact zeros and exact ReLU masks: in a group whose minimum is ``0`` the zero is a code, and a
  positive value never decodes to ``<= 0`` (codes of positive values are at least 1), so the mask a
  ReLU's backward reads from its own (quantized) output is exact whatever the bit width;
* a 1-bit mask stored beside the codes where a backward tests the saved tensor against thresholds
  that are not a group minimum (LeakyReLU/PReLU/ELU: ``x > 0``; ReLU6/Hardtanh: ``min < x < max``);
* max-pool indices kept exact in the narrowest integer type, dropout masks at one bit per element;
* normalization statistics and other 0-/1-D tensors are never taken (they stay exact).

The encode and decode have a fused CUDA implementation (``cuda/quant_pack.cu``) used for CUDA tensors
through :func:`lightning_memcomp.kernels.use_cuda_kernel`; the torch path here is the reference.
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
    pack_bits,
    pack_mask,
    unpack_bits,
    unpack_mask,
)
from lightning_memcomp.kernels import use_cuda_kernel
from lightning_memcomp.memory.engine import Codec, SaveContext

__all__ = ["QuantCodec", "QuantPayload", "dequantize_groups", "quantize_groups"]

KERNEL = "quant_pack"

# backward reads the saved tensor only through "x > 0" (sign) or "min < x < max" (hardtanh)
_SIGN_TYPES: tuple[type[nn.Module], ...] = (nn.LeakyReLU, nn.PReLU, nn.ELU, nn.RReLU)
_HARDTANH_TYPES: tuple[type[nn.Module], ...] = (nn.Hardtanh,)  # nn.ReLU6 is a Hardtanh


@dataclass
class QuantPayload:
    """A quantized tensor: packed codes, per-group fp16 ``lo``/``step`` with an int8 exponent each."""

    codes: Tensor  # uint8 [G, group_size * bits / 8]
    lo: Tensor  # float16 [G]
    step: Tensor  # float16 [G]
    exponent: Tensor  # int8 [G]: lo and step are relative to 2**exponent
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


def quantize_groups(
    groups: Tensor, bits: int, stochastic: bool, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference per-group quantizer: ``[G, S]`` floats -> (codes ``uint8 [G, S*bits/8]``, lo, step, exponent).

    ``lo`` and ``step`` are fp16 relative to ``2**exponent`` (exponent of the group's largest magnitude),
    so the grid is ``(lo + q * step) * 2**exponent`` for ``q`` in ``0 .. 2**bits - 1``. Positive values of
    a group whose ``lo`` is zero get codes >= 1 (they never decode to zero). The CUDA kernel computes
    the same numbers with the same float operations.
    """
    x = groups.float()
    levels = (1 << bits) - 1
    mn = x.amin(1)
    mx = x.amax(1)
    amax = torch.maximum(mn.abs(), mx.abs())
    exponent = torch.frexp(amax).exponent.clamp(-127, 127)
    inv_scale = torch.ldexp(torch.ones_like(amax), -exponent)
    lo = (mn * inv_scale).half()
    step = ((mx * inv_scale - lo.float()) / levels).half()
    lo_f = lo.float().unsqueeze(1)
    step_f = step.float().unsqueeze(1)
    v = (x * inv_scale.unsqueeze(1) - lo_f) / torch.where(step_f > 0, step_f, torch.ones_like(step_f))
    if stochastic:
        v = v + torch.rand(v.shape, device=v.device, generator=generator)
        q = v.floor_()
    else:
        q = v.round_()
    q = q.clamp_(0, levels)
    q = torch.where(step_f > 0, q, torch.zeros_like(q))
    # exact ReLU masks: a positive value never takes the code of zero
    q = torch.where((x > 0) & (lo_f == 0) & (step_f > 0), q.clamp(min=1), q)
    codes = pack_bits(q.to(torch.uint8), bits)
    return codes, lo, step, exponent.to(torch.int8)


def dequantize_groups(
    codes: Tensor, lo: Tensor, step: Tensor, exponent: Tensor, bits: int, dtype: torch.dtype
) -> Tensor:
    """Reference inverse of :func:`quantize_groups`: ``[G, S]`` of ``dtype``."""
    q = unpack_bits(codes, bits).float()
    lo_f = lo.float().unsqueeze(1)
    scale = torch.ldexp(torch.ones_like(lo_f), exponent.to(torch.int32).unsqueeze(1))
    x = (lo_f + q * step.float().unsqueeze(1)) * scale
    # a positive code of a zero-based group must stay positive in a narrow dtype too
    tiny = torch.finfo(dtype).tiny
    x = torch.where((q > 0) & (lo_f == 0), x.clamp(min=tiny), x)
    return x.to(dtype)


class QuantCodec(Codec):
    """k-bit per-group quantization with stochastic rounding and exact gradient routing.

    Args:
        bits: bits per stored element: 1, 2, 4 or 8 (fp32 -> 32 / bits times smaller, plus 5 bytes
            of metadata per group).
        group_size: elements per group sharing one ``lo``/``step`` (a multiple of 32, 32 to 65536).
            Larger groups: less metadata, coarser steps.
        stochastic: stochastic (unbiased) rounding; default ``True`` for ``bits <= 4``, ``False`` at 8.
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
        self.stochastic = self.bits <= 4 if stochastic is None else stochastic
        self._stochastic_option = stochastic
        self.seed = seed
        self.exact_routing = bool(exact_routing)
        self._generators: dict[torch.device, torch.Generator] = {}

    def __repr__(self) -> str:
        return (f"QuantCodec(bits={self.bits}, group_size={self.group_size}, stochastic={self.stochastic}, "
                f"exact_routing={self.exact_routing}, input_bits={self.input_bits})")

    # -- what is taken -------------------------------------------------------------------------
    def accepts(self, tensor: Tensor, ctx: SaveContext) -> bool:
        if self.exact_routing and is_routing_tensor(tensor, ctx.module):
            return True
        # 0-/1-D tensors are normalization statistics, biases or scalars: kept exact
        return tensor.is_floating_point() and tensor.dim() >= 2

    # -- random stream ---------------------------------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            seed = self.seed if self.seed is not None else torch.initial_seed() + 0x5EED
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
        mask, kind, bounds = None, None, None
        if self.exact_routing and isinstance(module, _SIGN_TYPES):
            kind = "sign"
            mask = BitMask(pack_mask(flat > 0), flat.numel())
        elif self.exact_routing and isinstance(module, _HARDTANH_TYPES):
            kind = "hardtanh"
            bounds = (float(module.min_val), float(module.max_val))
            mask = BitMask(pack_mask((flat > bounds[0]) & (flat < bounds[1])), flat.numel())
        codes, lo, step, exponent = self._quantize(_grouped(flat, self.group_size), bits, stochastic)
        return QuantPayload(codes, lo, step, exponent, mask, bits, flat.numel(), tuple(x.shape), order,
                            x.dtype, kind, bounds)

    def _quantize(self, groups: Tensor, bits: int, stochastic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ext = use_cuda_kernel(KERNEL, groups)
        if ext is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator(torch.device("cpu")))) if stochastic else 0
            codes, lo, step, exponent = ext.pack(groups.contiguous(), bits, stochastic, seed)
            return codes, lo, step, exponent
        gen = self.generator(groups.device) if stochastic else None
        return quantize_groups(groups, bits, stochastic, gen)

    def decode(self, payload: Any) -> Tensor:
        if not isinstance(payload, QuantPayload):
            return decode_routing(payload) if not isinstance(payload, Tensor) else payload
        ext = use_cuda_kernel(KERNEL, payload.codes)
        if ext is not None:
            groups = ext.unpack(payload.codes, payload.lo, payload.step, payload.exponent, payload.bits,
                                payload.dtype)
        else:
            groups = dequantize_groups(payload.codes, payload.lo, payload.step, payload.exponent, payload.bits,
                                       payload.dtype)
        flat = groups.reshape(-1)[: payload.numel]
        if payload.mask is not None:
            flat = _apply_mask(flat, unpack_mask(payload.mask.bits, payload.numel), payload.mask_kind,
                               payload.mask_bounds)
        return from_memory_order(flat, payload.shape, payload.order)


def _apply_mask(flat: Tensor, mask: Tensor, kind: str | None, bounds: tuple[float, float] | None) -> Tensor:
    """Force the decoded values onto the right side of the thresholds the stored mask records."""
    dtype = flat.dtype
    if kind == "sign":
        tiny = torch.finfo(dtype).tiny
        return torch.where(mask, flat.clamp(min=tiny), flat.clamp(max=0))
    if kind == "hardtanh" and bounds is not None:
        low = torch.tensor(bounds[0], dtype=dtype, device=flat.device)
        high = torch.tensor(bounds[1], dtype=dtype, device=flat.device)
        inside_low = torch.nextafter(low, high)
        inside_high = torch.nextafter(high, low)
        inside = torch.minimum(torch.maximum(flat, inside_low), inside_high)
        outside = torch.where(flat < (low + high) / 2, low, high)
        return torch.where(mask, inside, outside)
    return flat
