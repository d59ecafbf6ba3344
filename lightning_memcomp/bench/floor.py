"""``floor:B``: the memory floor of any ``B``-bit codec, as a benchmark row.

A stand-in codec that takes exactly what :class:`~lightning_memcomp.compression.quant.QuantCodec` takes,
holds a payload of the same size (``B`` bits per value plus 5 bytes per group of 256, written, so its
pages are resident), has no temporaries at all, and decodes to one freshly written tensor of zeros. Its
step peak is what a perfect ``B``-bit codec would reach on the same network: the codes it must hold plus the
one full-size tensor a decode must produce. **Its gradients are not real** (every decoded activation is
zero): use it only for the memory columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_memcomp.compression.bitpack import is_routing_tensor
from lightning_memcomp.compression.quant import QuantCodec
from lightning_memcomp.memory.engine import SaveContext

__all__ = ["FloorCodec", "FloorPayload"]


@dataclass(eq=False)
class FloorPayload:
    """As many bytes as a quant payload of the same bit width, and what decode needs to rebuild the shape."""

    codes: Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype


class FloorCodec(QuantCodec):
    """Holds a k-bit-sized payload and decodes to zeros: the memory floor of a k-bit codec (no real gradients)."""

    name = "floor"

    def encode(self, tensor: Tensor, ctx: SaveContext) -> Any:
        if self.exact_routing and is_routing_tensor(tensor, ctx.module):
            return super().encode(tensor, ctx)  # max-pool indices and dropout masks as quant keeps them
        bits = self.bits if tensor.requires_grad else (self.input_bits or 8)
        groups = -(-tensor.numel() // self.group_size)
        payload = torch.ones(groups * (self.group_size * bits // 8 + 5), dtype=torch.uint8, device=tensor.device)
        return FloorPayload(payload, tuple(tensor.shape), tensor.dtype)

    def decode(self, payload: Any) -> Tensor:
        if not isinstance(payload, FloorPayload):
            return super().decode(payload)
        return torch.zeros(payload.shape, dtype=payload.dtype, device=payload.codes.device)

    def decode_batch(self, payload: Any, start: int, stop: int) -> Tensor | None:
        if not isinstance(payload, FloorPayload):
            return super().decode_batch(payload, start, stop)
        return torch.zeros((stop - start, *payload.shape[1:]), dtype=payload.dtype, device=payload.codes.device)
