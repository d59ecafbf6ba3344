"""Block-DCT codec (Vu et al., TMLR 2024, Sec. 3.1.2): orthonormal DCT-II on spatial blocks, top-k, sparse.

``Y = B X`` with ``B`` the orthonormal DCT-II (the paper's Eq. 6 and 9) on non-overlapping spatial blocks,
16 x 16 by default as the paper states (its code ran a 1-D DCT along the last axis only; this follows the
paper): 2-D blocks for ``[N, C, H, W]``, 3-D blocks for ``[N, C, D, H, W]``, 1-D for ``[N, C, L]``. A block
is never larger than the map (an 8 x 8 map uses 8 x 8 blocks); sizes that are not multiples of the block
are padded by edge replication and cropped on decode. All blocks are transformed by two batched matrix
products per dimension, with the DCT matrix built once per (size, dtype, device). The codec transforms a
tensor span by span (whole maps, see :class:`~lightning_memcomp.compression.threshold.TopKCodec`), so the
coefficient tensor never exists in full.

Tensors with another number of dimensions (the ``[N, F]`` input of a ``Linear``) are not accepted and pass
through unchanged (the ledger counts them as passthrough).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_memcomp.compression.threshold import TopKCodec
from lightning_memcomp.compression.transforms import Scratch, block_dct, block_idct
from lightning_memcomp.memory.engine import SaveContext

__all__ = ["DCTCodec"]


class DCTCodec(TopKCodec):
    """Blockwise orthonormal DCT-II, keep the largest ``floor(N / lambda)`` coefficients, store sparse.

    Args:
        compression_ratio: ``lambda >= 1`` (default 10); ``1`` stores the tensor itself.
        block: block edge (default 16), or one edge per spatial dimension (a tuple then only applies to
            tensors with that many spatial dimensions).
        per_sample, value_dtype: see :class:`~lightning_memcomp.compression.threshold.TopKCodec`.

    Raises:
        ValueError: ``block`` not a positive integer or tuple of them, ``compression_ratio`` below 1; at
            encode time, a tuple ``block`` whose length does not match a tensor's spatial dimensions.

    Example::

        with compress_activations(model, codec="dct", compression_ratio=100, block=16) as ledger:
            loss = criterion(model(x), y)
        loss.backward()
    """

    name = "dct"
    spatial = True

    def __init__(
        self,
        compression_ratio: float = 10.0,
        *,
        block: int | tuple[int, ...] = 16,
        per_sample: bool = False,
        value_dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(compression_ratio, per_sample=per_sample, value_dtype=value_dtype)
        items = (block,) if isinstance(block, int) and not isinstance(block, bool) else block
        if (
            not isinstance(items, (tuple, list))
            or not 1 <= len(items) <= 3
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in items)
        ):
            raise ValueError(
                f"block={block!r} is not allowed; use a positive integer (16 in the paper) or a tuple of "
                "1 to 3 positive integers, one per spatial dimension"
            )
        self.block = block if isinstance(block, int) else tuple(block)

    def accepts(self, tensor: Tensor, ctx: SaveContext) -> bool:
        return super().accepts(tensor, ctx) and 3 <= tensor.dim() <= 5

    def blocks_for(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Block edges used for these spatial sizes (never larger than the map)."""
        if isinstance(self.block, int):
            edges = (self.block,) * len(spatial)
        elif len(self.block) != len(spatial):
            raise ValueError(
                f"block={self.block!r} gives {len(self.block)} edge(s) but a saved tensor has "
                f"{len(spatial)} spatial dimension(s) {spatial}; use an integer block or a matching tuple"
            )
        else:
            edges = self.block
        return tuple(min(b, s) for b, s in zip(edges, spatial))

    def forward_transform(self, x: Tensor) -> tuple[Tensor, Any]:
        blocks = self.blocks_for(tuple(x.shape[2:]))
        return block_dct(x, blocks), blocks

    def inverse_transform(self, coeffs: Tensor, meta: Any, shape: tuple[int, ...]) -> Tensor:
        return block_idct(coeffs, meta, shape[2:])

    def forward_span(self, x: Tensor, meta: Any, scratch: Scratch) -> Tensor:
        return block_dct(x, meta, scratch=scratch)

    def inverse_span(self, coeffs: Tensor, meta: Any, shape: tuple[int, ...], scratch: Scratch) -> Tensor:
        return block_idct(coeffs, meta, shape[2:], scratch=scratch)

    def _repr_options(self) -> str:
        return f", block={self.block!r}"
