"""Orthogonal transforms over the spatial dimensions of activation maps (Vu et al., TMLR 2024, Sec. 3.1).

Both transforms are linear and orthogonal, ``Y = W X`` (the paper's Eq. 8 and 9), applied separably along
each spatial dimension of a ``[N, C, *spatial]`` tensor (1, 2 or 3 spatial dimensions) as batched matrix
products on the tensor's own device; the matrices are built once per (transform, size, dtype, device) and
cached, so no call rebuilds filters and no Python loop runs over blocks.

* :func:`dwt` / :func:`idwt`: multi-level discrete wavelet transform in Mallat's layout (each level
  transforms the approximation block of the previous one, like ``pywt.wavedecn``), with PyWavelets'
  filters in ``"periodization"`` mode, which is orthogonal and keeps the coefficient count equal to the
  (padded) input size. Spatial sizes are padded by edge replication to a multiple of ``2 ** levels``.
* :func:`block_dct` / :func:`block_idct`: orthonormal DCT-II on non-overlapping blocks (the paper's Eq. 6),
  sizes padded by edge replication to a multiple of the block.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "block_dct",
    "block_idct",
    "dct_matrix",
    "dwt",
    "dwt_matrix",
    "idwt",
    "max_dwt_levels",
    "orthogonal_wavelets",
    "validate_wavelet",
]


# -- wavelets ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def orthogonal_wavelets() -> dict[str, list[str]]:
    """PyWavelets' orthogonal discrete wavelet families and their names (``haar``, ``db1..db38``, ...)."""
    import pywt

    discrete = set(pywt.wavelist(kind="discrete"))
    families: dict[str, list[str]] = {}
    for family in pywt.families(short=True):
        names = [name for name in pywt.wavelist(family) if name in discrete]
        if names and pywt.Wavelet(names[0]).orthogonal:
            families[family] = list(names)
    return families


def validate_wavelet(wavelet: str) -> str:
    """Return ``wavelet`` if PyWavelets names it as an orthogonal discrete wavelet, else raise."""
    families = orthogonal_wavelets()
    if isinstance(wavelet, str) and any(wavelet in names for names in families.values()):
        return wavelet
    listing = "; ".join(
        f"{family}: {names[0]}" + (f"..{names[-1]}" if len(names) > 1 else "") for family, names in families.items()
    )
    raise ValueError(
        f"wavelet={wavelet!r} is not an orthogonal discrete wavelet PyWavelets knows; use a name of one of "
        f"these families ({listing}); biorthogonal ('bior', 'rbio') and continuous wavelets are not allowed"
    )


def max_dwt_levels(sizes: Sequence[int]) -> int:
    """Deepest level these spatial sizes allow: ``floor(log2(min(sizes)))``, the last level on >= 2 samples.

    Periodization keeps every level orthogonal even where a filter is longer than the band it runs on, so
    this is a structural limit; PyWavelets' stricter ``dwt_max_level`` (no boundary effects) is not imposed.
    """
    return max(0, int(min(sizes)).bit_length() - 1)


@functools.lru_cache(maxsize=256)
def _dwt_matrix_np(wavelet: str, n: int) -> np.ndarray:
    """One analysis level as an ``n x n`` orthogonal matrix (rows: ``n/2`` approximation, ``n/2`` detail).

    Built column by column from ``pywt.dwt`` of the unit vectors, so it is PyWavelets' transform exactly.
    """
    import pywt

    if n % 2:
        raise ValueError(f"a periodized DWT level needs an even size, got {n}")
    eye = np.eye(n)
    lo, hi = pywt.dwt(eye, wavelet, mode="periodization", axis=-1)  # row j: transform of e_j
    return np.concatenate([lo, hi], axis=1).T.copy()


@functools.lru_cache(maxsize=512)
def dwt_matrix(wavelet: str, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """:func:`_dwt_matrix_np` as a tensor on ``device``; cached per (wavelet, size, dtype, device)."""
    return torch.as_tensor(_dwt_matrix_np(wavelet, n), dtype=dtype, device=device)


# -- DCT -----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def dct_matrix(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Orthonormal DCT-II matrix ``D[k, j] = c_k sqrt(2/n) cos(pi (2j + 1) k / 2n)``, ``c_0 = 1/sqrt(2)``."""
    j = np.arange(n)
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * j[None, :] + 1) * j[:, None] / (2 * n))
    d[0] /= np.sqrt(2.0)
    return torch.as_tensor(d, dtype=dtype, device=device)


# -- separable application -----------------------------------------------------------------------------
def _apply_along(x: Tensor, mat: Tensor, dim: int) -> Tensor:
    """Multiply every length-``b`` block along ``dim`` by ``mat`` (``b x b``); ``x.shape[dim] % b == 0``."""
    b = mat.shape[1]
    shape = x.shape
    pre = math.prod(shape[:dim]) * (shape[dim] // b)
    post = math.prod(shape[dim + 1 :])
    if post == 1:
        return (x.reshape(pre, b) @ mat.T).reshape(shape)
    return torch.matmul(mat, x.reshape(pre, b, post)).reshape(shape)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _pad_to_multiple(x: Tensor, multiples: Sequence[int]) -> Tensor:
    spatial = x.shape[2:]
    pads: list[int] = []
    for size, m in zip(reversed(spatial), reversed(multiples)):
        pads += [0, (-size) % m]
    if any(pads):
        x = F.pad(x, pads, mode="replicate")
    return x


def _crop(x: Tensor, spatial: Sequence[int]) -> Tensor:
    if tuple(x.shape[2:]) == tuple(spatial):
        return x
    return x[(slice(None), slice(None), *(slice(0, s) for s in spatial))]


def _check_rank(x: Tensor) -> int:
    nd = x.dim() - 2
    if nd not in (1, 2, 3):
        raise ValueError(
            f"transforms take [N, C, *spatial] tensors with 1, 2 or 3 spatial dimensions, got shape {tuple(x.shape)}"
        )
    return nd


def dwt(x: Tensor, wavelet: str, levels: int) -> Tensor:
    """Multi-level orthogonal DWT over the spatial dimensions of ``x`` (``[N, C, *spatial]``).

    Returns the coefficients in Mallat's layout on the spatial size padded to a multiple of
    ``2 ** levels`` (edge replication), in float32 (float64 inputs stay float64).
    """
    _check_rank(x)
    y = _pad_to_multiple(x.to(_work_dtype(x.dtype)), [1 << levels] * (x.dim() - 2)).contiguous()
    if levels == 0:
        return y.clone() if y is x else y
    sizes = list(y.shape[2:])
    for level in range(levels):
        region = y if level == 0 else y[(slice(None), slice(None), *(slice(0, s) for s in sizes))]
        r = region if level == 0 else region.contiguous()
        for i, s in enumerate(sizes):
            r = _apply_along(r, dwt_matrix(wavelet, s, y.dtype, y.device), 2 + i)
        if level == 0:
            y = r
        else:
            region.copy_(r)
        sizes = [s // 2 for s in sizes]
    return y


def idwt(coeffs: Tensor, wavelet: str, levels: int, spatial: Sequence[int]) -> Tensor:
    """Inverse of :func:`dwt`: the transposed (orthogonal) levels, deepest first, cropped to ``spatial``."""
    y = coeffs.clone() if levels > 1 else coeffs.contiguous()  # deeper levels are inverted in place
    full = list(y.shape[2:])
    for level in reversed(range(levels)):
        sizes = [s >> level for s in full]
        region = y if level == 0 else y[(slice(None), slice(None), *(slice(0, s) for s in sizes))]
        r = region if level == 0 else region.contiguous()
        for i, s in enumerate(sizes):
            r = _apply_along(r, dwt_matrix(wavelet, s, y.dtype, y.device).T, 2 + i)
        if level == 0:
            y = r
        else:
            region.copy_(r)
    return _crop(y, spatial)


def block_dct(x: Tensor, block: Sequence[int]) -> Tensor:
    """Orthonormal DCT-II on non-overlapping blocks over the spatial dimensions of ``x``.

    ``block`` gives the block size per spatial dimension; sizes that are not multiples are padded by edge
    replication. Returns float32 coefficients (float64 inputs stay float64) on the padded size.
    """
    nd = _check_rank(x)
    if len(block) != nd:
        raise ValueError(f"block={tuple(block)} must give one size per spatial dimension ({nd})")
    y = _pad_to_multiple(x.to(_work_dtype(x.dtype)), block)
    for i, b in enumerate(block):
        if b > 1:
            y = _apply_along(y, dct_matrix(b, y.dtype, y.device), 2 + i)
    return y


def block_idct(coeffs: Tensor, block: Sequence[int], spatial: Sequence[int]) -> Tensor:
    """Inverse of :func:`block_dct` (the transposed DCT matrix per block), cropped to ``spatial``."""
    y = coeffs
    for i, b in enumerate(block):
        if b > 1:
            y = _apply_along(y, dct_matrix(b, y.dtype, y.device).T, 2 + i)
    return _crop(y, spatial)
