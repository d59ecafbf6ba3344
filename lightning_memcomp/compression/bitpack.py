"""Bit packing and the exact gradient-routing payloads shared by the ``quant`` and ``blpa`` codecs.

* :func:`pack_bits` / :func:`unpack_bits`: k-bit codes (k in 1, 2, 4, 8) packed into ``uint8``, ``8 // k``
  codes per byte, the first code in the lowest bits (BLPA's "two 4-bit values per byte", generalised).
* :func:`memory_order` / :func:`from_memory_order`: flatten a tensor in the order its elements lie in
  memory (so ``channels_last`` tensors are grouped along channels and come back ``channels_last``).
* Routing payloads that keep what decides where gradients flow exact, whatever the bit width:
  max-pool indices stored in the narrowest integer type that holds them, dropout masks stored as one
  bit per element, and 1-bit masks for activations whose backward tests the sign of the saved tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "ALLOWED_BITS",
    "BitMask",
    "DropoutMask",
    "NarrowIndices",
    "check_bits",
    "decode_routing",
    "encode_routing",
    "from_memory_order",
    "is_routing_tensor",
    "memory_order",
    "pack_bits",
    "pack_mask",
    "unpack_bits",
    "mask_chunks",
    "pack_predicate",
    "unpack_mask",
    "unpack_mask_piece",
]

ALLOWED_BITS = (1, 2, 4, 8)

# Activations whose backward only reads the saved tensor through comparisons with thresholds.
_MAXPOOL_TYPES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
_DROPOUT_TYPES = (nn.modules.dropout._DropoutNd,)


def check_bits(bits: object, option: str = "bits") -> int:
    """Validate a bit width; returns it as an ``int``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"{option}={bits!r} is not allowed; use one of 1, 2, 4, 8")
    return bits


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack ``uint8`` codes below ``2**bits`` (last dimension a multiple of ``8 // bits``) into bytes."""
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    codes = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (codes << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``uint8`` codes, ``8 // bits`` per input byte."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))


def pack_mask(mask: Tensor) -> Tensor:
    """A boolean tensor as one bit per element (flattened, padded to a whole byte)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return pack_bits(flat.view(-1, 8).to(torch.uint8), 1).reshape(-1)


def unpack_mask(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_mask`: a flat boolean tensor of ``numel`` elements."""
    return unpack_bits(packed.view(-1, 1), 1).reshape(-1)[:numel].bool()


#: elements per piece of the chunked mask helpers (a multiple of 8): their temporaries stay below 4 MiB
MASK_CHUNK = 1 << 20


def mask_chunks(numel: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` pieces of ``numel`` elements, :data:`MASK_CHUNK` at a time (starts on whole bytes)."""
    for start in range(0, numel, MASK_CHUNK):
        yield start, min(numel, start + MASK_CHUNK)


def pack_predicate(flat: Tensor, predicate: Callable[[Tensor], Tensor]) -> Tensor:
    """:func:`pack_mask` of ``predicate(flat)``, computed piece by piece: no full-size boolean temporary."""
    n = flat.numel()
    out = torch.empty((n + 7) // 8, dtype=torch.uint8, device=flat.device)
    for start, stop in mask_chunks(n):
        out[start // 8:(stop + 7) // 8] = pack_mask(predicate(flat[start:stop]))
    return out


def unpack_mask_piece(packed: Tensor, start: int, stop: int) -> Tensor:
    """Elements ``start:stop`` of :func:`unpack_mask` (``start`` a multiple of 8)."""
    return unpack_mask(packed[start // 8:(stop + 7) // 8], stop - start)


def memory_order(t: Tensor) -> tuple[Tensor, tuple[int, ...] | None]:
    """``t`` flattened in memory order, and the permutation to undo (``None``: plain contiguous).

    Dense tensors in any dimension order (``channels_last``, ``channels_last_3d``, transposed) are
    flattened without a copy; other strided tensors are made contiguous first.
    """
    if t.is_contiguous():
        return t.reshape(-1), None
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d])))
    permuted = t.permute(order)
    if permuted.is_contiguous():
        return permuted.reshape(-1), order
    return t.contiguous().reshape(-1), None


def from_memory_order(flat: Tensor, shape: tuple[int, ...], order: tuple[int, ...] | None) -> Tensor:
    """Inverse of :func:`memory_order`: the tensor of ``shape`` with the original memory layout."""
    if order is None:
        return flat.reshape(shape)
    permuted_shape = tuple(shape[d] for d in order)
    inverse = [0] * len(order)
    for i, d in enumerate(order):
        inverse[d] = i
    return flat.reshape(permuted_shape).permute(inverse)


@dataclass
class NarrowIndices:
    """Max-pool indices in the narrowest signed integer type that holds the largest one."""

    values: Tensor
    dtype: torch.dtype


@dataclass
class DropoutMask:
    """A dropout multiplier (``0`` or ``1 / (1 - p)``) or a boolean keep-mask, at one bit per element."""

    bits: Tensor
    keep_value: Tensor  # 0-d, the multiplier of kept elements (unused for boolean masks)
    shape: tuple[int, ...]
    order: tuple[int, ...] | None
    dtype: torch.dtype


@dataclass
class BitMask:
    """A flat 1-bit mask (e.g. ``x > 0`` of a LeakyReLU input) stored beside quantized values."""

    bits: Tensor
    numel: int


def is_routing_tensor(tensor: Tensor, module: nn.Module | None) -> bool:
    """Whether ``tensor`` decides where gradients flow: max-pool indices or a dropout mask."""
    if module is None:
        return False
    if isinstance(module, _MAXPOOL_TYPES):
        return tensor.dtype == torch.int64 and tensor.dim() >= 2
    if isinstance(module, _DROPOUT_TYPES):
        # CUDA's fused dropout saves a bool mask; the CPU path saves the float multiplier, which does
        # not require grad (unlike every activation saved alongside it)
        return tensor.dtype == torch.bool or (tensor.is_floating_point() and not tensor.requires_grad)
    return False


def encode_routing(tensor: Tensor) -> NarrowIndices | DropoutMask | None:
    """Encode a tensor for which :func:`is_routing_tensor` holds, exactly (``None``: not a mask after all)."""
    if tensor.dtype == torch.int64:
        largest = int(tensor.max()) if tensor.numel() else 0
        for dtype in (torch.int16, torch.int32):
            if largest <= torch.iinfo(dtype).max:
                return NarrowIndices(tensor.to(dtype), torch.int64)
        return NarrowIndices(tensor, torch.int64)
    flat, order = memory_order(tensor)
    if tensor.dtype == torch.bool:
        return DropoutMask(pack_predicate(flat, lambda piece: piece), torch.zeros((), device=tensor.device),
                           tuple(tensor.shape), order, torch.bool)
    keep_value = flat.max() if flat.numel() else torch.zeros((), dtype=tensor.dtype, device=tensor.device)
    # the multiplier takes exactly two values, 0 and keep_value; anything else is not a dropout mask
    for start, stop in mask_chunks(flat.numel()):
        piece = flat[start:stop]
        if not bool(((piece == 0) | (piece == keep_value)).all()):
            return None
    return DropoutMask(pack_predicate(flat, lambda piece: piece != 0), keep_value.reshape(()), tuple(tensor.shape),
                       order, tensor.dtype)


def decode_routing(payload: NarrowIndices | DropoutMask) -> Tensor:
    """Inverse of :func:`encode_routing`, bit-exact."""
    if isinstance(payload, NarrowIndices):
        return payload.values.to(payload.dtype)
    numel = 1
    for s in payload.shape:
        numel *= s
    # written piece by piece into the one output tensor
    flat = torch.empty(numel, dtype=payload.dtype, device=payload.bits.device)
    keep_value = payload.keep_value.to(payload.dtype)
    for start, stop in mask_chunks(numel):
        target = flat[start:stop]
        target.copy_(unpack_mask_piece(payload.bits, start, stop))
        if payload.dtype != torch.bool:
            target.mul_(keep_value)
    return from_memory_order(flat, payload.shape, payload.order)
