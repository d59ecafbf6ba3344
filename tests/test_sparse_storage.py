"""Sparse storage of top-k coefficients: cheapest layout, narrow indices, never more than dense + header."""

from __future__ import annotations

import pytest
import torch

from lightning_memcomp.compression.sparse import (
    HEADER_NBYTES,
    choose_layout,
    index_dtype,
    keep_topk,
    layout_nbytes,
    pack_bits,
    unpack_bits,
)


def _reference_topk(y: torch.Tensor, k: int) -> torch.Tensor:
    """Dense reference: every entry outside the k largest magnitudes of its row set to zero."""
    out = torch.zeros_like(y)
    order = y.abs().argsort(dim=1, descending=True)[:, :k]
    return out.scatter_(1, order, y.gather(1, order))


@pytest.mark.parametrize(
    ("n", "dtype"),
    [(256, torch.uint8), (257, torch.int16), (1 << 15, torch.int16), ((1 << 15) + 1, torch.uint16),
     (1 << 16, torch.uint16), ((1 << 16) + 1, torch.int32), ((1 << 31) + 1, torch.int64)],
)
def test_index_dtype_is_the_narrowest_that_holds_every_position(n: int, dtype: torch.dtype) -> None:
    assert index_dtype(n) == dtype


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_pack_bits_round_trips_and_uses_one_bit_per_entry(n: int) -> None:
    mask = torch.rand(3, n) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, (n + 7) // 8)
    assert torch.equal(unpack_bits(packed, n), mask)


@pytest.mark.parametrize("ratio", [1.01, 1.4, 2.5, 10, 100])
def test_keep_topk_keeps_exactly_the_largest_magnitudes(ratio: float) -> None:
    y = torch.randn(4, 3000)
    k = int(3000 // ratio)
    kept = keep_topk(y, k)
    assert torch.equal(kept.to_dense(), _reference_topk(y, k))


@pytest.mark.parametrize(("ratio", "layout"), [(1.01, "dense"), (1.1, "bitmap"), (2.5, "bitmap"),
                                               (10, "bitmap"), (100, "coo")])
def test_layout_is_the_cheapest_for_the_ratio(ratio: float, layout: str) -> None:
    n = 100_000
    k = int(n // ratio)
    kept = keep_topk(torch.randn(1, n), k)
    assert kept.layout == layout
    costs = [layout_nbytes(name, 1, n, k, 4) for name in ("dense", "bitmap", "coo")]
    assert kept.nbytes - HEADER_NBYTES == min(costs)


@pytest.mark.parametrize("value_dtype", [None, torch.float16])
@pytest.mark.parametrize("ratio", [1.0001, 1.03, 1.1, 1.4, 2.5, 3, 10, 100, 1000])
def test_stored_bytes_never_exceed_dense_plus_header(ratio: float, value_dtype: torch.dtype | None) -> None:
    n = 4096
    y = torch.randn(2, n)
    kept = keep_topk(y, int(n // ratio), value_dtype=value_dtype)
    assert kept.nbytes <= y.numel() * y.element_size() + HEADER_NBYTES


def test_coo_beats_paper_int64_coo_at_low_ratio() -> None:
    """The paper's COO (int64 index + fp32 value = 12 bytes per kept entry) costs 1.66x dense at lambda 2.5."""
    n = 65_536
    k = int(n / 2.5)
    paper = k * 12
    assert keep_topk(torch.randn(1, n), k).nbytes < 0.5 * paper


def test_half_precision_values_halve_the_values_and_saturate_instead_of_overflowing() -> None:
    y = torch.randn(1, 10_000)
    y[0, 0] = 1e6
    full = keep_topk(y, 100)
    half = keep_topk(y, 100, value_dtype=torch.float16)
    assert half.values.dtype == torch.float16
    assert half.values.numel() * 2 == full.values.numel() * full.values.element_size() // 2
    dense = half.to_dense()
    assert dense.dtype == torch.float32
    assert torch.isfinite(dense).all()
    assert dense[0, 0] == torch.finfo(torch.float16).max


def test_keep_zero_stores_no_entries_and_decodes_to_zeros() -> None:
    kept = keep_topk(torch.randn(3, 50), 0)
    assert kept.nbytes == HEADER_NBYTES
    assert torch.equal(kept.to_dense(), torch.zeros(3, 50))


def test_keep_all_is_dense_and_exact() -> None:
    y = torch.randn(2, 33)
    kept = keep_topk(y, 33)
    assert kept.layout == "dense"
    assert torch.equal(kept.to_dense(), y)


def test_choose_layout_ties_prefer_dense() -> None:
    assert choose_layout(1, 8, 8, 4) == "dense"


@pytest.mark.parametrize("k", [-1, 11])
def test_keep_topk_rejects_k_outside_the_row(k: int) -> None:
    with pytest.raises(ValueError, match="k="):
        keep_topk(torch.randn(1, 10), k)


def test_keep_topk_rejects_value_dtype_that_is_not_floating() -> None:
    with pytest.raises(ValueError, match="value_dtype"):
        keep_topk(torch.randn(1, 10), 3, value_dtype=torch.int8)
