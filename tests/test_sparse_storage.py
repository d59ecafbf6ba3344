"""Sparse storage of top-k coefficients: cheapest layout, narrow indices, never more than dense + header."""

from __future__ import annotations

import pytest
import torch

from lightning_memcomp.compression import sparse
from lightning_memcomp.compression.sparse import (
    HEADER_NBYTES,
    choose_layout,
    index_dtype,
    keep_topk,
    layout_nbytes,
    pack_bits,
    plan_spans,
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


# -- selection span by span (radix select on long rows) ------------------------------------------------
@pytest.fixture
def short_spans(monkeypatch):
    """Spans of 64 entries and radix select from rows of 17 entries on, so small tensors take every path
    that large ones take (several spans per row, unaligned bitmap bytes, ties across spans)."""
    monkeypatch.setattr(sparse, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(sparse, "SMALL_ROW", 16)


def _check_valid_topk(y: torch.Tensor, kept: sparse.SparseCoefficients, k: int) -> None:
    """Exactly ``k`` entries per row, their values unchanged, none smaller in magnitude than a dropped one."""
    dense = kept.to_dense()
    assert dense.shape == y.shape and dense.dtype == y.dtype
    keep = torch.zeros_like(y, dtype=torch.bool)
    if kept.layout == "coo":
        keep.scatter_(1, kept.index.to(torch.int64), True)
        assert bool((kept.index.to(torch.int64).diff(dim=1) > 0).all()), "coo positions not increasing"
    elif kept.layout == "bitmap":
        keep = unpack_bits(kept.index, y.shape[1])
    else:
        keep = dense != 0 if k < y.shape[1] else torch.ones_like(keep)
    assert keep.sum(1).tolist() == [k] * y.shape[0]
    assert torch.equal(dense[keep], y[keep]) and bool((dense[~keep] == 0).all())
    mag = y.abs().double()
    for row in range(y.shape[0]):
        if 0 < k < y.shape[1]:
            assert mag[row][keep[row]].min() >= mag[row][~keep[row]].max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("ratio", [1, 1.01, 1.5, 2.5, 10, 100, 1000])
def test_span_by_span_selection_keeps_exactly_a_valid_top_k(short_spans, dtype, rows, ratio) -> None:
    torch.manual_seed(0)
    n = 1000
    y = torch.randn(rows, n).to(dtype)
    k = int(n // ratio)
    kept = keep_topk(y, k)
    _check_valid_topk(y, kept, k)
    assert torch.equal(kept.to_dense().abs().sort(1).values, _reference_topk(y, k).abs().sort(1).values)


@pytest.mark.parametrize("k", [0, 1, 5, 99, 100, 101, 350, 399, 400, 401, 799, 800])
def test_ties_at_the_threshold_keep_the_first_in_position_order(short_spans, k: int) -> None:
    """Many equal magnitudes (both signs) across spans: exactly k kept; among the entries equal to the
    threshold, the first ones in position order."""
    values = torch.tensor([3.0, -2.0, 2.0, 1.0, -1.0, 0.25, 0.5, -0.5])
    y = values.repeat_interleave(100)[torch.randperm(800, generator=torch.Generator().manual_seed(1))][None]
    kept = keep_topk(y, k)
    _check_valid_topk(y, kept, k)
    if 0 < k < 800:
        mag = y[0].abs()
        threshold = mag.sort(descending=True).values[k - 1]
        tied = (mag == threshold).nonzero().squeeze(1)
        ties_kept = k - int((mag > threshold).sum())
        assert torch.equal(kept.to_dense()[0, tied] != 0, torch.arange(tied.numel()) < ties_kept)


def test_mostly_zero_rows_keep_every_nonzero_entry(short_spans) -> None:
    torch.manual_seed(0)
    y = torch.relu(torch.randn(2, 500)) * (torch.rand(2, 500) < 0.3)
    nonzero = (y != 0).sum(1)
    for k in (1, 50, 300, 499):
        dense = keep_topk(y, k).to_dense()
        assert torch.equal((dense != 0).sum(1), nonzero.clamp(max=k))
        assert torch.equal(dense[dense != 0], y[dense != 0])


def test_all_equal_and_all_zero_rows(short_spans) -> None:
    for k in (0, 1, 150, 299, 300):
        _check_valid_topk(torch.full((2, 300), -1.5), keep_topk(torch.full((2, 300), -1.5), k), k)
        assert torch.equal(keep_topk(torch.zeros(2, 300), k).to_dense(), torch.zeros(2, 300))
    kept = keep_topk(torch.full((1, 300), 2.0), 100)
    assert torch.equal(kept.to_dense()[0] != 0, torch.arange(300) < 100)  # the first 100, deterministically


@pytest.mark.parametrize("n", [100, 1000])
def test_span_by_span_equals_one_span(monkeypatch, n: int) -> None:
    torch.manual_seed(0)
    y = torch.randn(4, n)
    for ratio in (1.1, 2.5, 10, 100):
        k = int(n // ratio)
        whole = keep_topk(y, k)
        monkeypatch.setattr(sparse, "CHUNK_ELEMENTS", 24)
        monkeypatch.setattr(sparse, "SMALL_ROW", 8)
        parts = keep_topk(y, k)
        monkeypatch.undo()
        assert parts.layout == whole.layout and parts.nbytes == whole.nbytes
        assert torch.equal(parts.to_dense(), whole.to_dense())


def test_nan_counts_as_the_largest_magnitude(short_spans) -> None:
    y = torch.randn(1, 500)
    y[0, 7] = float("nan")
    dense = keep_topk(y, 10).to_dense()
    assert torch.isnan(dense[0, 7])


def test_plan_spans_respects_blocks_and_units() -> None:
    assert plan_spans(0, 4) == []
    assert plan_spans(12, 4, 2, budget=8) == [(0, 8), (8, 12)]  # whole blocks together
    assert plan_spans(12, 4, 2, group=False, budget=8) == [(0, 4), (4, 8), (8, 12)]
    assert plan_spans(24, 12, 3, budget=7) == [(0, 6), (6, 12), (12, 18), (18, 24)]  # whole units, no straddle
    assert plan_spans(10, 10, 5, budget=2) == [(0, 5), (5, 10)]  # at least one unit


@pytest.mark.parametrize("ratio", [1.01, 2.5, 10, 100])
def test_the_sync_free_accelerator_path_gives_the_host_path_result(short_spans, monkeypatch, ratio) -> None:
    """Device-side offsets and histograms (what CUDA runs), checked on the CPU."""
    torch.manual_seed(0)
    y = torch.randn(3, 700)
    y[:, ::7] = 0.5  # ties across spans
    k = int(700 // ratio)
    host = keep_topk(y, k)
    monkeypatch.setattr(sparse, "DEVICE_PATH_ON_CPU", True)
    device = keep_topk(y, k)
    assert device.layout == host.layout
    assert torch.equal(device.values, host.values)
    assert (device.index is None) == (host.index is None)
    if host.index is not None:
        assert torch.equal(device.index, host.index)
    assert torch.equal(device.to_dense(), host.to_dense())
    monkeypatch.setattr(sparse, "DEVICE_PATH_ON_CPU", False)
    assert torch.equal(device.to_dense(), host.to_dense())


@pytest.mark.parametrize("ratio", [1.5, 10, 100])
def test_selection_is_exact_when_the_first_span_misleads_the_window(short_spans, ratio) -> None:
    """The second digit is counted in a window around the first span's estimate; a first span unlike the
    rest puts the threshold outside it, and a second pass finds it."""
    torch.manual_seed(0)
    y = torch.randn(1, 2000)
    y[0, :64] *= 1e-3  # the first span: magnitudes far below the rest
    y[0, 64:128] *= 1e3  # the second: far above
    k = int(2000 // ratio)
    kept = keep_topk(y, k)
    _check_valid_topk(y, kept, k)
    assert torch.equal(kept.to_dense(), _reference_topk(y, k))


def test_float32_rows_are_read_twice_when_the_first_span_is_representative(monkeypatch) -> None:
    """One pass counts both digits (the second in a window around the first span's estimate), one stores."""
    monkeypatch.setattr(sparse, "CHUNK_ELEMENTS", 1 << 15)
    torch.manual_seed(0)
    y = torch.randn(1 << 18)
    reads = []

    def read(start: int, stop: int) -> torch.Tensor:
        reads.append(start)
        return y[start:stop]

    kept, _ = sparse.select_topk(read, 1, y.numel(), y.numel() // 10, dtype=y.dtype, device=y.device)
    assert len(reads) == 2 * 8
    assert torch.equal(kept.to_dense()[0], _reference_topk(y[None], y.numel() // 10)[0])
