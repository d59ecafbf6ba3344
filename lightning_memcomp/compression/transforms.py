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

Given a :class:`Scratch`, the four functions write their intermediates and result into its reused buffers
instead of fresh tensors (the codecs transform a tensor span by span, several times over: see
:func:`~lightning_memcomp.compression.sparse.select_topk`); the result is then valid until the next call
that uses the same scratch.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Scratch",
    "block_dct",
    "block_idct",
    "dct_matrix",
    "dwt",
    "dwt_matrix",
    "idwt",
    "max_dwt_levels",
    "orthogonal_wavelets",
    "release_scratch",
    "shared_scratch",
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


# -- scratch buffers -----------------------------------------------------------------------------------
class Scratch:
    """Named buffers reused by every span (and pass) of one encode or decode.

    Large blocks are mapped by the C allocator afresh (glibc past its mmap threshold, which a process may
    set as low as 64 KiB), so each new span-sized temporary costs a map, page faults and an unmap, more than
    the arithmetic on it; a few buffers reused for every span pay that once per call. A buffer grows to the
    largest request made under its name; a tensor from :meth:`get` is valid until that name is asked again.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: Sequence[int] | int, dtype: torch.dtype) -> Tensor:
        """An uninitialised ``shape`` tensor of ``dtype`` in the buffer ``name``."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 8), dtype=torch.uint8, device=self.device)
            self._buffers[name] = buf
        return buf[:nbytes].view(dtype).view(shape)

    def copy(self, name: str, t: Tensor) -> Tensor:
        """``t`` copied (row-major) into the buffer ``name``."""
        return self.get(name, t.shape, t.dtype).copy_(t)


_SHARED = threading.local()


def shared_scratch(device: torch.device | str) -> Scratch:
    """The calling thread's :class:`Scratch` for ``device``: on the CPU one kept between calls, so that no
    call maps and faults its buffers in afresh (span-sized: 13-19 MiB in all at the default
    :data:`~lightning_memcomp.compression.sparse.CHUNK_ELEMENTS`, measured after the dct, threshold and
    wavelet codecs on a CIFAR ResNet-18; :func:`release_scratch` frees them), elsewhere a new one (CUDA's
    caching allocator already keeps freed blocks)."""
    device = torch.device(device)
    if device.type != "cpu":
        return Scratch(device)
    scratch = getattr(_SHARED, "cpu", None)
    if scratch is None:
        scratch = _SHARED.cpu = Scratch(device)
    return scratch


def release_scratch() -> None:
    """Free the calling thread's shared CPU scratch buffers (the next codec call builds them again)."""
    _SHARED.cpu = None


def _out(scratch: Scratch | None, name: str, like: Tensor) -> Tensor | None:
    return None if scratch is None else scratch.get(name, like.shape, like.dtype)


# -- separable application -----------------------------------------------------------------------------
def _apply_along(x: Tensor, mat: Tensor, dim: int, out: Tensor | None = None) -> Tensor:
    """Multiply every length-``b`` block along ``dim`` by ``mat`` (``b x b``); ``x.shape[dim] % b == 0``.
    ``out``: a contiguous tensor of ``x``'s shape to write the result into."""
    b = mat.shape[1]
    shape = x.shape
    pre = math.prod(shape[:dim]) * (shape[dim] // b)
    post = math.prod(shape[dim + 1 :])
    if post == 1:
        target = None if out is None else out.view(pre, b)
        return torch.mm(x.reshape(pre, b), mat.T, out=target).reshape(shape)
    target = None if out is None else out.view(pre, b, post)
    return torch.matmul(mat, x.reshape(pre, b, post), out=target).reshape(shape)


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


def _separable(y: Tensor, mats: Sequence[Tensor | None], scratch: Scratch | None, names: tuple[str, str]) -> Tensor:
    """``mats[i]`` applied along spatial dimension ``i`` (``None``: skipped), ping-ponging between two
    scratch buffers (never the input's)."""
    turn = 0
    for i, mat in enumerate(mats):
        if mat is not None:
            y = _apply_along(y, mat, 2 + i, _out(scratch, names[turn], y))
            turn ^= 1
    return y


def _as_work(x: Tensor, scratch: Scratch | None) -> Tensor:
    """``x`` in the working dtype (float32, float64 stays): with ``scratch``, converted (and made
    contiguous) into its buffer ``t.input`` rather than a new tensor."""
    work = _work_dtype(x.dtype)
    if scratch is None or (x.dtype == work and x.is_contiguous()):
        return x.to(work)
    return scratch.get("t.input", x.shape, work).copy_(x)


def _contiguous(x: Tensor, scratch: Scratch | None, name: str) -> Tensor:
    if x.is_contiguous():
        return x
    return x.contiguous() if scratch is None else scratch.copy(name, x)


def _levels(y: Tensor, wavelet: str, levels: int, scratch: Scratch | None, inverse: bool) -> Tensor:
    """The levels of :func:`dwt` (``inverse``: of :func:`idwt`) on ``y``, whose deeper levels are transformed
    in place (``y`` must be writable)."""
    full = list(y.shape[2:])
    order = reversed(range(levels)) if inverse else range(levels)
    for level in order:
        sizes = [s >> level for s in full]
        mats = [dwt_matrix(wavelet, s, y.dtype, y.device) for s in sizes]
        mats = [m.T for m in mats] if inverse else mats
        if level == 0:
            y = _separable(y, mats, scratch, ("t.a", "t.b"))
            continue
        region = y[(slice(None), slice(None), *(slice(0, s) for s in sizes))]
        r = _separable(region.contiguous() if scratch is None else scratch.copy("t.r", region), mats, scratch,
                       ("t.ra", "t.rb"))
        region.copy_(r)
    return y


def dwt(x: Tensor, wavelet: str, levels: int, *, scratch: Scratch | None = None) -> Tensor:
    """Multi-level orthogonal DWT over the spatial dimensions of ``x`` (``[N, C, *spatial]``).

    Returns the coefficients in Mallat's layout on the spatial size padded to a multiple of
    ``2 ** levels`` (edge replication), in float32 (float64 inputs stay float64).
    """
    _check_rank(x)
    y = _contiguous(_pad_to_multiple(_as_work(x, scratch), [1 << levels] * (x.dim() - 2)), scratch, "t.input")
    if levels == 0:
        if y is not x:
            return y
        return y.clone() if scratch is None else scratch.copy("t.input", y)
    return _levels(y, wavelet, levels, scratch, inverse=False)  # the first level writes a new tensor


def idwt(coeffs: Tensor, wavelet: str, levels: int, spatial: Sequence[int], *,
         scratch: Scratch | None = None) -> Tensor:
    """Inverse of :func:`dwt`: the transposed (orthogonal) levels, deepest first, cropped to ``spatial``."""
    if levels > 1:  # deeper levels are inverted in place
        y = coeffs.clone() if scratch is None else scratch.copy("t.input", coeffs)
    else:
        y = _contiguous(coeffs, scratch, "t.input")
    return _crop(_levels(y, wavelet, levels, scratch, inverse=True), spatial)


def block_dct(x: Tensor, block: Sequence[int], *, scratch: Scratch | None = None) -> Tensor:
    """Orthonormal DCT-II on non-overlapping blocks over the spatial dimensions of ``x``.

    ``block`` gives the block size per spatial dimension; sizes that are not multiples are padded by edge
    replication. Returns float32 coefficients (float64 inputs stay float64) on the padded size.
    """
    nd = _check_rank(x)
    if len(block) != nd:
        raise ValueError(f"block={tuple(block)} must give one size per spatial dimension ({nd})")
    y = _pad_to_multiple(_as_work(x, scratch), block)
    if scratch is not None:
        y = _contiguous(y, scratch, "t.input")
    return _separable(y, [dct_matrix(b, y.dtype, y.device) if b > 1 else None for b in block], scratch,
                      ("t.a", "t.b"))


def block_idct(coeffs: Tensor, block: Sequence[int], spatial: Sequence[int], *,
               scratch: Scratch | None = None) -> Tensor:
    """Inverse of :func:`block_dct` (the transposed DCT matrix per block), cropped to ``spatial``."""
    y = coeffs if scratch is None else _contiguous(coeffs, scratch, "t.input")
    mats = [dct_matrix(b, y.dtype, y.device).T if b > 1 else None for b in block]
    return _crop(_separable(y, mats, scratch, ("t.a", "t.b")), spatial)
