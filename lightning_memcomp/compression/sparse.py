"""Sparse storage for top-k thresholded coefficients that never costs more than dense (Vu et al., TMLR 2024).

The paper keeps the ``k = floor(N / lambda)`` largest-magnitude coefficients (its Eq. 10-12) and stores
them as a COO sparse tensor with int64 indices: 12 bytes per kept fp32 value, more than dense below
``lambda`` of about 3 (their Table 3: +66% at ``lambda = 2.5``). Here the layout is chosen per tensor,
from the shapes alone (no data-dependent size, hence no host sync), as the cheapest of

* ``"dense"``: all ``n`` values of each row, the ``n - k`` smallest set to zero;
* ``"bitmap"``: one bit per position (packed 8 per byte) plus the ``k`` kept values in position order;
* ``"coo"``: the ``k`` kept values and their positions in the narrowest integer dtype that holds
  ``n - 1`` (uint8, int16, uint16, int32 or int64).

Values are kept in the tensor's dtype, or in ``value_dtype`` (``float16``/``bfloat16``) to halve them.
A payload costs its tensors plus :data:`HEADER_NBYTES` for the fixed fields (layout, shape, dtype), so
stored bytes are at most ``dense + HEADER_NBYTES``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "HEADER_NBYTES",
    "LAYOUTS",
    "SparseCoefficients",
    "choose_layout",
    "index_dtype",
    "keep_topk",
    "layout_nbytes",
    "pack_bits",
    "unpack_bits",
]

#: bytes charged for a payload's fixed fields (layout, rows, n, k, dtype): a nominal, honest upper bound
HEADER_NBYTES = 64
LAYOUTS = ("dense", "bitmap", "coo")
_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def index_dtype(n: int) -> torch.dtype:
    """The narrowest integer dtype that holds every position ``0 .. n - 1``."""
    if n <= 1 << 8:
        return torch.uint8
    if n <= 1 << 15:
        return torch.int16
    if n <= 1 << 16:
        return torch.uint16
    if n <= 1 << 31:
        return torch.int32
    return torch.int64


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def layout_nbytes(layout: str, rows: int, n: int, k: int, value_itemsize: int) -> int:
    """Bytes of the tensors a layout keeps for ``rows`` rows of ``n`` entries with ``k`` kept per row."""
    if layout == "dense":
        return rows * n * value_itemsize
    if layout == "bitmap":
        return rows * ((n + 7) // 8 + k * value_itemsize)
    if layout == "coo":
        return rows * k * (value_itemsize + _itemsize(index_dtype(n)))
    raise ValueError(f"layout={layout!r} is not allowed; use one of {', '.join(LAYOUTS)}")


def choose_layout(rows: int, n: int, k: int, value_itemsize: int) -> str:
    """The cheapest layout for the given sizes (ties go to the simpler one: dense, then coo)."""
    costs = {name: layout_nbytes(name, rows, n, k, value_itemsize) for name in ("dense", "coo", "bitmap")}
    return min(costs, key=costs.__getitem__)


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a boolean tensor ``[..., n]`` into ``[..., ceil(n / 8)]`` uint8, least significant bit first.

    Eight 0/1 bytes are read as one little-endian int64 and folded into its low byte with three
    shift-or steps, so the work runs on ``n / 8`` words instead of ``n`` bytes.
    """
    n = mask.shape[-1]
    pad = (-n) % 8
    m = mask.contiguous().view(torch.uint8)
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    words = m.view(torch.int64)  # byte i of a word holds bit i of the result
    words = words | (words >> 7)
    words = words | (words >> 14)
    words = words | (words >> 28)
    return (words & 0xFF).to(torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``[..., ceil(n / 8)]`` uint8 to a boolean ``[..., n]``."""
    words = packed.to(torch.int64)
    words = (words | (words << 28)) & 0x0000000F0000000F
    words = (words | (words << 14)) & 0x0003000300030003
    words = (words | (words << 7)) & 0x0101010101010101
    bits = words.view(torch.uint8).view(torch.bool)  # [..., 8 * ceil(n / 8)], byte i = bit i
    return bits[..., :n]


@dataclass(eq=False)
class SparseCoefficients:
    """The ``k`` largest-magnitude entries of each row of a ``[rows, n]`` array, in one of :data:`LAYOUTS`.

    ``values`` is ``[rows, n]`` for ``"dense"`` and ``[rows, k]`` otherwise; ``index`` is the packed
    bitmap ``[rows, ceil(n / 8)]`` (uint8) for ``"bitmap"``, the positions ``[rows, k]`` for ``"coo"``
    and ``None`` for ``"dense"``. ``dtype`` is the dtype :meth:`to_dense` returns.
    """

    layout: str
    rows: int
    n: int
    k: int
    values: Tensor
    index: Tensor | None
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held: the tensors plus :data:`HEADER_NBYTES`."""
        held = self.values.numel() * self.values.element_size()
        if self.index is not None:
            held += self.index.numel() * self.index.element_size()
        return held + HEADER_NBYTES

    def to_dense(self) -> Tensor:
        """The ``[rows, n]`` array with every entry that was not kept set to zero."""
        values = self.values.to(self.dtype)
        if self.layout == "dense":
            return values
        out = torch.zeros(self.rows, self.n, dtype=self.dtype, device=values.device)
        if self.k == 0:
            return out
        assert self.index is not None
        if self.layout == "coo":
            return out.scatter_(1, self.index.to(torch.int64), values)
        return out.masked_scatter_(unpack_bits(self.index, self.n), values)


def _cast_values(values: Tensor, value_dtype: torch.dtype) -> Tensor:
    if values.dtype == value_dtype:
        return values
    if value_dtype == torch.float16:  # no inf from large transform coefficients
        limit = torch.finfo(torch.float16).max
        values = values.clamp(-limit, limit)
    return values.to(value_dtype)


def keep_topk(y: Tensor, k: int, *, value_dtype: torch.dtype | None = None) -> SparseCoefficients:
    """Keep the ``k`` largest-magnitude entries of each row of ``y`` (``[rows, n]``), stored cheaply.

    Vu et al. Eq. 10-12: ``Y_l = M_l * Y`` with ``M_l`` marking the ``k`` largest ``|y_i|``. The layout
    depends only on ``rows, n, k`` and the value itemsize, so choosing it needs no host sync.

    Args:
        y: a floating ``[rows, n]`` tensor.
        k: entries kept per row, ``0 <= k <= n``.
        value_dtype: dtype the kept values are stored in (default: ``y.dtype``).
    """
    if y.dim() != 2:
        raise ValueError(f"keep_topk expects a [rows, n] tensor, got shape {tuple(y.shape)}")
    rows, n = y.shape
    if not 0 <= k <= n:
        raise ValueError(f"k={k} is not allowed for rows of {n} entries; use 0 <= k <= {n}")
    value_dtype = y.dtype if value_dtype is None else value_dtype
    if value_dtype not in _VALUE_DTYPES:
        raise ValueError(
            f"value_dtype={value_dtype!r} is not allowed; use one of float16, bfloat16, float32, float64"
        )
    layout = choose_layout(rows, n, k, _itemsize(value_dtype))
    if k == n:
        return SparseCoefficients("dense", rows, n, k, _cast_values(y, value_dtype), None, y.dtype)
    if k == 0:
        empty = y.new_empty(rows, 0, dtype=value_dtype)
        return SparseCoefficients("coo", rows, n, 0, empty, empty.new_empty(rows, 0, dtype=index_dtype(n)),
                                  y.dtype)
    idx = y.abs().topk(k, dim=1, sorted=False).indices
    if layout == "dense":
        kept = torch.zeros_like(y).scatter_(1, idx, y.gather(1, idx))
        return SparseCoefficients("dense", rows, n, k, _cast_values(kept, value_dtype), None, y.dtype)
    if layout == "coo":
        return SparseCoefficients("coo", rows, n, k, _cast_values(y.gather(1, idx), value_dtype),
                                  idx.to(index_dtype(n)), y.dtype)
    mask = torch.zeros(rows, n, dtype=torch.bool, device=y.device).scatter_(1, idx, True)
    # bitmap values go in position order: the rank of a kept position among the kept ones (no sort)
    rank = mask.cumsum(dim=1, dtype=torch.int32).gather(1, idx).to(torch.int64) - 1
    values = torch.empty(rows, k, dtype=y.dtype, device=y.device).scatter_(1, rank, y.gather(1, idx))
    return SparseCoefficients("bitmap", rows, n, k, _cast_values(values, value_dtype), pack_bits(mask), y.dtype)
