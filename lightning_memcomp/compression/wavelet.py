"""Wavelet-transform codec (WT, Vu et al., TMLR 2024, Sec. 3.1.1): multi-level DWT, top-k, sparse storage.

``Y = W X`` with ``W`` the multi-level orthogonal discrete wavelet transform over the spatial dimensions
(the paper's Eq. 8): 2-D for ``[N, C, H, W]`` maps, 3-D for ``[N, C, D, H, W]`` volumes (never flattened to
2-D), 1-D for ``[N, C, L]``. All sub-bands, the coarsest included, compete for the ``k = floor(N / lambda)``
kept coefficients. Filters come from PyWavelets (periodization mode, orthogonal); the transform runs in
torch on the tensor's device (:mod:`~lightning_memcomp.compression.transforms`), span by span (whole maps,
see :class:`~lightning_memcomp.compression.threshold.TopKCodec`), so the coefficient tensor never exists in
full.

Shapes: tensors with 1, 2 or 3 spatial dimensions are transformed; others (the ``[N, F]`` input of a
``Linear``) are not accepted and pass through unchanged (the ledger counts them as passthrough).
Levels deeper than ``floor(log2(smallest spatial size))`` are clipped, with one warning per shape; a
tensor that allows no level at all is thresholded directly.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from lightning_memcomp.compression.threshold import TopKCodec
from lightning_memcomp.compression.transforms import Scratch, dwt, idwt, max_dwt_levels, validate_wavelet
from lightning_memcomp.memory.engine import SaveContext

__all__ = ["WaveletCodec"]


class WaveletCodec(TopKCodec):
    """Multi-level orthogonal DWT, keep the largest ``floor(N / lambda)`` coefficients, store sparse.

    Args:
        compression_ratio: ``lambda >= 1`` (default 10); ``1`` stores the tensor itself.
        wavelet: any orthogonal discrete wavelet PyWavelets names (``"haar"``, ``"db3"``, ``"sym4"``,
            ``"coif1"``, ``"dmey"``, ...). The paper used Haar and Daubechies-3.
        levels: decomposition levels (default 3), clipped per tensor to what its size allows.
        per_sample, value_dtype: see :class:`~lightning_memcomp.compression.threshold.TopKCodec`.

    Raises:
        ValueError: unknown or non-orthogonal ``wavelet`` (the message lists the families), ``levels``
            below 1, ``compression_ratio`` below 1.

    Example::

        with compress_activations(unet, codec="wavelet", wavelet="haar", levels=3, compression_ratio=10):
            loss = dice(unet(volume), target)
        loss.backward()
    """

    name = "wavelet"
    spatial = True

    def __init__(
        self,
        compression_ratio: float = 10.0,
        *,
        wavelet: str = "haar",
        levels: int = 3,
        per_sample: bool = False,
        value_dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(compression_ratio, per_sample=per_sample, value_dtype=value_dtype)
        self.wavelet = validate_wavelet(wavelet)
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels={levels!r} is not allowed; use an integer >= 1 (the paper used 3)")
        self.levels = levels
        self._warned: set[tuple[int, ...]] = set()

    def accepts(self, tensor: Tensor, ctx: SaveContext) -> bool:
        return super().accepts(tensor, ctx) and 3 <= tensor.dim() <= 5

    def levels_for(self, spatial: tuple[int, ...]) -> int:
        """Levels used for these spatial sizes: ``levels`` clipped to :func:`max_dwt_levels` (warns once)."""
        allowed = max_dwt_levels(spatial)
        if allowed >= self.levels:
            return self.levels
        if spatial not in self._warned:
            self._warned.add(spatial)
            warnings.warn(
                f"wavelet codec: levels={self.levels} is too deep for spatial size {spatial}; using "
                f"{allowed} level(s) there" + (" (plain thresholding)" if allowed == 0 else ""),
                stacklevel=2,
            )
        return allowed

    def forward_transform(self, x: Tensor) -> tuple[Tensor, Any]:
        levels = self.levels_for(tuple(x.shape[2:]))
        return dwt(x, self.wavelet, levels), levels

    def inverse_transform(self, coeffs: Tensor, meta: Any, shape: tuple[int, ...]) -> Tensor:
        return idwt(coeffs, self.wavelet, meta, shape[2:])

    def forward_span(self, x: Tensor, meta: Any, scratch: Scratch) -> Tensor:
        return dwt(x, self.wavelet, meta, scratch=scratch)

    def inverse_span(self, coeffs: Tensor, meta: Any, shape: tuple[int, ...], scratch: Scratch) -> Tensor:
        return idwt(coeffs, self.wavelet, meta, shape[2:], scratch=scratch)

    def _repr_options(self) -> str:
        return f", wavelet={self.wavelet!r}, levels={self.levels}"
