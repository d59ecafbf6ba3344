"""Sparse storage for top-k thresholded coefficients that never costs more than dense (Vu et al., TMLR 2024).

The paper keeps the ``k = floor(N / lambda)`` largest-magnitude coefficients (its Eq. 10-12) and stores
them as a COO sparse tensor with int64 indices: 12 bytes per kept fp32 value, more than dense below
``lambda`` of about 3 (their Table 3: +66% at ``lambda = 2.5``). Here the layout is chosen per tensor,
from the shapes alone (no data-dependent size, hence no host sync), as the cheapest of

* ``"dense"``: all ``n`` values of each row, the ``n - k`` smallest set to zero;
* ``"bitmap"``: one bit per position (packed 8 per byte) plus the ``k`` kept values in position order;
* ``"coo"``: the ``k`` kept values and their positions, in increasing order, in the narrowest integer
  dtype that holds ``n - 1`` (uint8, int16, uint16, int32 or int64).

Values are kept in the tensor's dtype, or in ``value_dtype`` (``float16``/``bfloat16``) to halve them.
A payload costs its tensors plus :data:`HEADER_NBYTES` for the fixed fields (layout, shape, dtype), so
stored bytes are at most ``dense + HEADER_NBYTES``.

Bounded memory. :func:`select_topk` reads the ``[rows, n]`` coefficients span by span (at most
:data:`CHUNK_ELEMENTS` entries, whole transform maps: a codec recomputes a span's transform whenever it is
read, so the coefficient tensor never exists in full) and writes straight into the preallocated payload;
:meth:`SparseCoefficients.iter_dense` rebuilds the dense coefficients span by span for the decoder. Besides
the payload, no temporary grows with the tensor; span-sized temporaries live in reused buffers
(:class:`~lightning_memcomp.compression.transforms.Scratch`).

Exact top ``k`` of a long row by radix select on the magnitudes' bits (a finite non-negative float orders
like its bit pattern read as an integer), 16 bits at a time: a pass histograms the first digit; the next
digit is histogrammed among the entries whose first digit is the one holding the ``k``-th largest, and so
on (two digits for float32, one for float16/bfloat16, four for float64). That gives the exact threshold
``T``, the ``k``-th largest magnitude, and how many entries equal to ``T`` to keep; a last pass keeps every
entry above ``T`` and the first of those equal to ``T`` in position order, so exactly ``k`` are kept,
deterministically. For float32 on the CPU the first pass instead histograms both digits at once, for the
entries within eight first digits around where a sample of the first span puts the ``k``-th largest: when
the threshold falls there (spans hold whole samples, so the first is representative; measured: always, on
the activations of a CIFAR ResNet-18 under dct, wavelet and threshold), each span is read twice, not three
times (else two more counting passes follow). Short rows (``n <=`` :data:`SMALL_ROW`) use
``torch.topk``. On accelerators nothing needs a host sync, except to read the counts a COO decode of a
long row needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_memcomp.compression.quant import CHUNK_BYTES
from lightning_memcomp.compression.transforms import Scratch, shared_scratch

__all__ = [
    "CHUNK_ELEMENTS",
    "HEADER_NBYTES",
    "LAYOUTS",
    "SMALL_ROW",
    "SparseCoefficients",
    "choose_layout",
    "index_dtype",
    "keep_topk",
    "layout_nbytes",
    "pack_bits",
    "plan_spans",
    "select_topk",
    "unpack_bits",
]

#: bytes charged for a payload's fixed fields (layout, rows, n, k, dtype): a nominal, honest upper bound
HEADER_NBYTES = 64
LAYOUTS = ("dense", "bitmap", "coo")
_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: entries per span: a span's int64 temporaries take CHUNK_BYTES, its float32 and int32 ones half that.
#: Measured on a 128 MiB float32 tensor (``tests/test_transform_codecs_memory.py``): encode peaks at about
#: payload + 4 to 5 spans of float32, decode at output + 3 to 4.
CHUNK_ELEMENTS = CHUNK_BYTES // 8
#: rows up to this length are thresholded with ``torch.topk`` (cheaper there than radix select's passes)
SMALL_ROW = 1 << 14
_BINS = 1 << 16  # one 16-bit digit of the magnitudes' bits per radix pass
#: first digits around the first span's estimate whose second digits the first pass also counts: measured
#: on a CIFAR ResNet-18's activations (dct, threshold, wavelet), the threshold's first digit lies 3 below
#: to 1 above the estimate from the first of 4 to 8 spans
_WINDOW = 8
_SAMPLE = 1 << 15  # entries of the first span that estimate the window
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}

Reader = Callable[[int, int], Tensor]
#: run the accelerator path (device-side offsets, no host sync) on the CPU as well: for tests
DEVICE_PATH_ON_CPU = False


def _host_path(device: torch.device | str) -> bool:
    """Whether data-dependent counts may be read on the host (the CPU: nothing to sync with)."""
    return torch.device(device).type == "cpu" and not DEVICE_PATH_ON_CPU


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


def pack_bits(mask: Tensor, *, scratch: Scratch | None = None) -> Tensor:
    """Pack a boolean tensor ``[..., n]`` into ``[..., ceil(n / 8)]`` uint8, least significant bit first.

    Eight 0/1 bytes are read as one little-endian int64 and folded into its low byte with three
    shift-or steps, so the work runs on ``n / 8`` words instead of ``n`` bytes. With ``scratch``, the
    temporaries and the result live in its buffers.
    """
    n = mask.shape[-1]
    pad = (-n) % 8
    m = mask.contiguous().view(torch.uint8)
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    words = m.view(torch.int64)  # byte i of a word holds bit i of the result
    if scratch is None:
        words = words | (words >> 7)
        words = words | (words >> 14)
        words = words | (words >> 28)
        return (words & 0xFF).to(torch.uint8)
    shifted = scratch.get("pack.shifted", words.shape, torch.int64)
    folded = torch.bitwise_or(words, torch.bitwise_right_shift(words, 7, out=shifted),
                              out=scratch.get("pack.folded", words.shape, torch.int64))
    folded.bitwise_or_(torch.bitwise_right_shift(folded, 14, out=shifted))
    folded.bitwise_or_(torch.bitwise_right_shift(folded, 28, out=shifted))
    return scratch.get("pack.out", words.shape, torch.uint8).copy_(folded.bitwise_and_(0xFF))


def unpack_bits(packed: Tensor, n: int, *, scratch: Scratch | None = None, name: str = "unpack.words") -> Tensor:
    """Inverse of :func:`pack_bits`: ``[..., ceil(n / 8)]`` uint8 to a boolean ``[..., n]``. With
    ``scratch``, the result lives in its buffer ``name``."""
    if scratch is None:
        words = packed.to(torch.int64)
        words = (words | (words << 28)) & 0x0000000F0000000F
        words = (words | (words << 14)) & 0x0003000300030003
        words = (words | (words << 7)) & 0x0101010101010101
    else:
        words = scratch.get(name, packed.shape, torch.int64).copy_(packed)
        shifted = scratch.get("unpack.shifted", packed.shape, torch.int64)
        for shift, keep in ((28, 0x0000000F0000000F), (14, 0x0003000300030003), (7, 0x0101010101010101)):
            words.bitwise_or_(torch.bitwise_left_shift(words, shift, out=shifted)).bitwise_and_(keep)
    bits = words.view(torch.uint8).view(torch.bool)  # [..., 8 * ceil(n / 8)], byte i = bit i
    return bits[..., :n]


def plan_spans(total: int, block: int, unit: int = 1, *, group: bool = True,
               budget: int | None = None) -> list[tuple[int, int]]:
    """Split ``[0, total)`` into ``(start, stop)`` spans of at most ``budget`` entries (default
    :data:`CHUNK_ELEMENTS`, but never less than one ``unit``).

    ``total`` is a multiple of ``block``, and ``block`` of ``unit``. A block that fits the budget is never
    split: a span is then whole blocks (one only, unless ``group``); a larger block is split into spans of
    whole units, never across blocks. A codec's unit is one transform map, its block one sample (or one
    row: spans then never straddle rows).
    """
    budget = CHUNK_ELEMENTS if budget is None else budget
    if total <= 0:
        return []
    if block <= budget:
        step = max(1, budget // block) * block if group else block
        return [(g, min(g + step, total)) for g in range(0, total, step)]
    step = max(1, budget // unit) * unit
    return [(b + s, b + min(s + step, block)) for b in range(0, total, block) for s in range(0, block, step)]


def _magnitude_bits(y: Tensor, scratch: Scratch | None = None) -> Tensor:
    """``|y|`` as non-negative integers of the same width, ordered like the magnitudes (NaN above Inf)."""
    ints = y.view(_INT_VIEW[y.element_size()])
    out = None if scratch is None else scratch.get("bits", ints.shape, ints.dtype)
    return torch.bitwise_and(ints, torch.iinfo(ints.dtype).max, out=out)


def _count(hist: Tensor, digits: Tensor) -> Tensor:
    """Add to ``hist`` how many ``digits`` fall on each bin, in place (no temporary: ``bincount`` would
    validate with two scans and widen the digits to a new int64 tensor first)."""
    if digits.dtype not in (torch.int32, torch.int64):
        digits = digits.to(torch.int32)  # float16/bfloat16 magnitudes: int16
    ones = torch.ones((), dtype=hist.dtype, device=hist.device).expand(digits.numel())
    return hist.index_add_(0, digits.reshape(-1), ones)


def _histogram(digits: Tensor, bins: int) -> Tensor:
    return _count(torch.zeros(bins, dtype=torch.int64, device=digits.device), digits)


def _cast_values(values: Tensor, value_dtype: torch.dtype) -> Tensor:
    if values.dtype == value_dtype:
        return values
    if value_dtype == torch.float16:  # no inf from large transform coefficients
        limit = torch.finfo(torch.float16).max
        values = values.clamp(-limit, limit)
    return values.to(value_dtype)


@dataclass(eq=False)
class SparseCoefficients:
    """The ``k`` largest-magnitude entries of each row of a ``[rows, n]`` array, in one of :data:`LAYOUTS`.

    ``values`` is ``[rows, n]`` for ``"dense"`` and ``[rows, k]`` otherwise (in position order); ``index``
    is the packed bitmap ``[rows, ceil(n / 8)]`` (uint8) for ``"bitmap"``, the positions ``[rows, k]`` (in
    increasing order) for ``"coo"`` and ``None`` for ``"dense"``. ``dtype`` is the dtype :meth:`to_dense`
    returns.
    """

    layout: str
    rows: int
    n: int
    k: int
    values: Tensor
    index: Tensor | None
    dtype: torch.dtype

    @classmethod
    def allocate(cls, layout: str, rows: int, n: int, k: int, value_dtype: torch.dtype, dtype: torch.dtype,
                 device: torch.device, *, zeroed: bool = True) -> SparseCoefficients:
        """Payload tensors for ``layout`` (zeroed, or left uninitialised), to be filled span by span."""
        new = torch.zeros if zeroed else torch.empty
        if layout == "dense":
            return cls(layout, rows, n, k, new(rows, n, dtype=value_dtype, device=device), None, dtype)
        values = new(rows, k, dtype=value_dtype, device=device)
        if layout == "bitmap":
            index = new(rows, (n + 7) // 8, dtype=torch.uint8, device=device)
        else:
            index = new(rows, k, dtype=index_dtype(n), device=device)
        return cls(layout, rows, n, k, values, index, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held: the tensors plus :data:`HEADER_NBYTES`."""
        held = self.values.numel() * self.values.element_size()
        if self.index is not None:
            held += self.index.numel() * self.index.element_size()
        return held + HEADER_NBYTES

    def to_dense(self) -> Tensor:
        """The ``[rows, n]`` array with every entry that was not kept set to zero."""
        out = torch.empty(self.rows, self.n, dtype=self.dtype, device=self.values.device)
        flat = out.view(-1)
        spans = plan_spans(self.rows * self.n, self.n)
        for (g0, g1), dense in zip(spans, self.iter_dense(spans)):
            flat[g0:g1] = dense
        return out

    # -- decoding span by span -------------------------------------------------------------------------
    def iter_dense(self, spans: list[tuple[int, int]], scratch: Scratch | None = None) -> Iterator[Tensor]:
        """The dense entries (``dtype``, 1-D) of each span of the flattened ``[rows, n]`` array, in order.

        ``spans`` increase and each is whole rows or part of one row (as :func:`plan_spans` gives them);
        only one span's worth of temporaries is alive at a time: each yielded tensor lives in a buffer of
        ``scratch`` (default: a new one) and is overwritten by the next (or is a view of the payload).
        """
        scratch = shared_scratch(self.values.device) if scratch is None else scratch
        n = self.n
        row = -1
        on_cpu = _host_path(self.values.device)
        offset: int | Tensor = 0  # bitmap: values of the current row before this span
        starts: list[int] = []  # coo: each span's first entry in its row
        first = 0
        for number, (g0, g1) in enumerate(spans):
            r, s = divmod(g0, n)
            if s == 0 and (g1 - g0) % n == 0 and g1 > g0:
                yield self._dense_rows(r, r + (g1 - g0) // n, scratch).reshape(-1)
                continue
            if r != row:
                row = r
                offset = 0 if on_cpu else torch.zeros((), dtype=torch.int64, device=self.values.device)
                if self.layout == "coo" and self.k:
                    starts = self._coo_starts(r, [(a - r * n, b - r * n) for a, b in spans if a // n == r])
                first = number
            dense, offset = self._dense_part(r, s, g1 - r * n, offset, starts, number - first, scratch)
            yield dense

    def _dense_rows(self, r0: int, r1: int, scratch: Scratch) -> Tensor:
        values = self.values[r0:r1].to(self.dtype)
        if self.layout == "dense":
            return values
        out = scratch.get("bits", (r1 - r0, self.n), self.dtype).zero_()
        if self.k == 0:
            return out
        assert self.index is not None
        if self.layout == "coo":
            return out.scatter_(1, self.index[r0:r1].to(torch.int64), values)
        return out.masked_scatter_(unpack_bits(self.index[r0:r1], self.n, scratch=scratch, name="tied"), values)

    def _dense_part(self, r: int, s: int, e: int, offset: int | Tensor, starts: list[int], which: int,
                    scratch: Scratch) -> tuple[Tensor, int | Tensor]:
        if self.layout == "dense":
            return self.values[r, s:e].to(self.dtype), offset
        length = e - s
        out = scratch.get("bits", length, self.dtype).zero_()
        if self.k == 0:
            return out, offset
        assert self.index is not None
        values = self.values[r]
        if self.layout == "coo":
            a, b = starts[which], starts[which + 1]
            return out.scatter_(0, self.index[r, a:b].to(torch.int64) - s, values[a:b].to(self.dtype)), offset
        lead, b0, b1 = s % 8, s // 8, (e + 7) // 8
        mask = unpack_bits(self.index[r, b0:b1], 8 * (b1 - b0), scratch=scratch, name="tied")[lead:lead + length]
        if isinstance(offset, int):  # CPU: the kept count, then the values in position order
            count = int(torch.count_nonzero(mask))
            return out.masked_scatter_(mask, values[offset:offset + count].to(self.dtype)), offset + count
        seen = mask.cumsum(0, dtype=torch.int32)
        # the j-th kept entry of the row is values[r, j]: gather, then zero the entries that were not kept
        where = (seen - 1 + offset).clamp_(0, self.k - 1)
        return torch.mul(values.index_select(0, where).to(self.dtype), mask, out=out), offset + seen[-1]

    def _coo_starts(self, r: int, parts: list[tuple[int, int]]) -> list[int]:
        """Where each part's entries start among row ``r``'s positions (sorted), and the end: one host read."""
        assert self.index is not None
        ends = torch.tensor([b for _, b in parts], dtype=torch.int64, device=self.index.device)
        counts = torch.zeros(len(parts), dtype=torch.int64, device=self.index.device)
        positions = self.index[r]
        for a in range(0, self.k, CHUNK_ELEMENTS):
            part = torch.searchsorted(ends, positions[a:a + CHUNK_ELEMENTS].to(torch.int64), right=True)
            counts += _histogram(part, len(parts))
        return [0, *torch.cumsum(counts, 0).tolist()]


# -- encoding span by span -----------------------------------------------------------------------------
def _radix_threshold(read: Reader, spans: list[tuple[int, int]], k: int, width: int, first: Tensor | None,
                     scratch: Scratch) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k``-th largest magnitude (as ``width``-bit integer) among the entries of ``spans``, how many
    entries equal to it are among the top ``k``, and whether that is all of them. ``first``: the first
    digit's histogram, when the caller has it. All on the device (no host sync); ``1 <= k <=`` entries."""
    prefix: Tensor | None = None
    need: Tensor | None = None
    in_bin: Tensor | None = None
    for d in range(width // 16):
        hist = first if d == 0 else None
        if hist is None:
            hist = torch.zeros(_BINS + 2 if d else _BINS, dtype=torch.int64, device=scratch.device)
            for g0, g1 in spans:
                _digit_count(hist, _magnitude_bits(read(g0, g1), scratch), width, d, prefix)
            hist = hist[1:_BINS + 1] if d else hist
        if need is None or prefix is None:
            need = torch.full((), k, dtype=torch.int64, device=hist.device)
            prefix = torch.zeros((), dtype=torch.int64, device=hist.device)
        digit, need, in_bin = _locate(hist, need)
        prefix = prefix * _BINS + digit
    assert prefix is not None and need is not None and in_bin is not None
    return prefix, need, need == in_bin


def _windowed_pass(read: Reader, spans: list[tuple[int, int]], k: int, total: int,
                   scratch: Scratch) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """One pass over float32 magnitudes: the largest one's bits, and the threshold of
    :func:`_radix_threshold` when it falls in the window, else ``None`` (host reads: CPU only).

    A sample of the first span estimates the ``k``-th largest; every span then histograms both digits at
    once (19 bits) for the entries whose first digit lies in :data:`_WINDOW` digits around the estimate's,
    plus how many lie above. Entries below need no count (the rank is counted from the top).
    """
    span = _WINDOW * _BINS
    wide = torch.int32 if total < 1 << 31 else torch.int64
    counts = scratch.get("window", span + 2, wide).zero_()
    largest: Tensor | None = None
    base = 0
    for number, (g0, g1) in enumerate(spans):
        bits = _magnitude_bits(read(g0, g1), scratch)
        largest = _maximum(largest, bits.amax())
        if number == 0:
            # random positions (a stride would alias with the maps' structure: DCT blocks, image rows); the
            # estimate only decides how fast, never what is kept
            where = torch.randint(bits.numel(), (min(_SAMPLE, bits.numel()),),
                                  generator=torch.Generator().manual_seed(0), device=bits.device)
            sample = bits[where]
            rank = max(1, min(sample.numel(), round(k * sample.numel() / total)))  # from the top
            estimate = int(torch.kthvalue(sample, sample.numel() - rank + 1).values)
            base = max(0, (estimate >> 16) - _WINDOW // 2)
        # bin 0: below the window, 1 .. span: in it, span + 1: above it (arithmetic, no branchy select)
        _count(counts, bits.sub_(base * _BINS - 1).clamp_(0, span + 1))
    assert largest is not None
    # the first digit on the host from the window's eight sums, then the second within it
    remaining = k - int(counts[span + 1])
    sums = counts[1:span + 1].view(_WINDOW, _BINS).sum(1, dtype=wide).tolist()
    for digit in reversed(range(_WINDOW)):
        if remaining <= 0:
            break  # the k-th largest is above the window
        if sums[digit] >= remaining:
            second, need, in_bin = _locate(counts[1 + digit * _BINS:1 + (digit + 1) * _BINS], remaining)
            threshold = second + (base + digit) * _BINS
            return largest, (threshold, need, need == in_bin)
        remaining -= sums[digit]
    return largest, None  # above or below the window


def _locate(hist: Tensor, need: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
    """The bin holding the ``need``-th largest entry of ``hist``, how many of that bin are then needed, and
    how many it holds (device tensors)."""
    above = hist.flip(0).cumsum(0)  # above[j]: entries in the top j + 1 bins
    needed = torch.as_tensor(need, dtype=torch.int64, device=hist.device).reshape(1)
    j = torch.searchsorted(above, needed).clamp_(max=hist.numel() - 1)[0]
    digit = hist.numel() - 1 - j
    in_bin = hist[digit]
    return digit, needed[0] - (above[j] - in_bin), in_bin


def _digit_count(hist: Tensor, bits: Tensor, width: int, d: int, prefix: Tensor | None) -> None:
    """Add to ``hist`` digit ``d`` (16 bits, most significant first) of the entries whose higher digits
    equal ``prefix`` (bins ``1 .. 65536``; the others fall on bins 0 and 65537), or of all entries
    (``d = 0``, bins ``0 .. 65535``); ``bits`` (a temporary) is overwritten."""
    shift = width - 16 * (d + 1)
    if shift:
        bits.bitwise_right_shift_(shift)
    if d == 0:
        _count(hist, bits)  # the sign bit is clear: < 2**15
        return
    # arithmetic, no branchy select: entries of the prefix's bin fall on 1 .. _BINS
    _count(hist, bits.sub_(prefix * _BINS - 1).clamp_(0, _BINS + 1))


class _Writer:
    """Fills a :class:`SparseCoefficients` span by span; ``scale`` multiplies the values before the cast."""

    def __init__(self, coeffs: SparseCoefficients, value_dtype: torch.dtype, scale: Tensor | None,
                 scratch: Scratch) -> None:
        self.coeffs = coeffs
        self.value_dtype = value_dtype
        self.scale = scale
        self.scratch = scratch

    def cast(self, y: Tensor) -> Tensor:
        if self.scale is not None:
            y = y * self.scale.to(y.dtype)
        return _cast_values(y, self.value_dtype)

    def rows(self, r0: int, y: Tensor) -> None:
        """Keep the top ``k`` of each row of ``y`` (``[rb, n]``, rows ``r0 ..``) with ``torch.topk``."""
        c = self.coeffs
        r1 = r0 + y.shape[0]
        idx = y.abs().topk(c.k, dim=1, sorted=False).indices.sort(dim=1).values  # in position order
        kept = y.gather(1, idx)
        if c.layout == "dense":
            c.values[r0:r1] = self.cast(torch.zeros_like(y).scatter_(1, idx, kept))
            return
        assert c.index is not None
        c.values[r0:r1] = self.cast(kept)
        if c.layout == "coo":
            c.index[r0:r1] = idx.to(c.index.dtype)
        else:
            c.index[r0:r1] = pack_bits(torch.zeros(y.shape, dtype=torch.bool, device=y.device).scatter_(1, idx, True))

    def part(self, r: int, s: int, y: Tensor, keep: Tensor, offset: int | Tensor) -> int | Tensor:
        """Store the entries of ``y`` (row ``r`` from position ``s``) where ``keep``, after the ``offset``
        entries kept before them in the row; returns the new offset (an int on the CPU, a device tensor
        elsewhere: no sync)."""
        c = self.coeffs
        e = s + y.numel()
        if c.layout == "dense":
            c.values[r, s:e] = self.cast(y * keep)  # arithmetic, not a branchy select: values are finite
            return offset
        assert c.index is not None
        if c.layout == "bitmap":
            lead = s % 8
            bits = pack_bits(torch.cat([keep.new_zeros(lead), keep]) if lead else keep, scratch=self.scratch)
            window = c.index[r, s // 8:s // 8 + bits.numel()]
            shared = window[:1].clone() if lead else None  # the previous span's bits of the first byte
            window.copy_(bits)
            if shared is not None:
                window[:1] |= shared
        if isinstance(offset, int):  # CPU: compact with the kept count (no device to sync with)
            # nonzero + index_select: masked_select counts with a bool sum that widens to a new int64 tensor
            count = int(torch.count_nonzero(keep))
            where = torch.nonzero(keep, out=self.scratch.get("where", count, torch.int64)[:0]).squeeze(1)
            kept = torch.index_select(y, 0, where, out=self.scratch.get("kept", count, y.dtype))
            c.values[r, offset:offset + count] = self.cast(kept)
            if c.layout == "coo":
                c.index[r, offset:offset + count] = where.add_(s)
            return offset + count
        seen = keep.cumsum(0, dtype=torch.int32 if c.n < 1 << 31 else torch.int64)
        # the j-th kept entry goes to slot offset + j; the others add 0 to a kept slot (exact), no sync
        slot = (seen - 1 + offset).clamp_(min=0)
        c.values[r].index_add_(0, slot, self.cast(y * keep))
        if c.layout == "coo":
            positions = torch.arange(s, e, dtype=c.index.dtype, device=y.device)
            c.index[r].index_add_(0, slot, positions * keep)
        return offset + seen[-1]


def select_topk(
    read: Reader,
    rows: int,
    n: int,
    k: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    value_dtype: torch.dtype | None = None,
    block: int | None = None,
    unit: int = 1,
    check_finite: bool = False,
    fit_below: float | None = None,
    scratch: Scratch | None = None,
) -> tuple[SparseCoefficients, Tensor | None] | None:
    """Keep the ``k`` largest-magnitude entries of each row of a ``[rows, n]`` array read span by span.

    ``read(start, stop)`` returns the entries ``start .. stop - 1`` of the flattened array as a 1-D tensor
    of ``dtype`` (a codec computes the transform of those maps there). Spans come from
    :func:`plan_spans` with ``block`` (default ``n``; it divides ``n``, and equals it when ``rows > 1``) and
    ``unit``. Rows up to :data:`SMALL_ROW` use ``torch.topk``; longer ones radix select (see the module),
    with one read of every span per 16-bit digit plus one to store (float32 on the CPU, one row: usually
    one counting read for both digits). ``read`` may return a buffer it reuses: each result is used up
    before the next call.

    Args:
        check_finite: return ``None`` (before anything is kept) when an entry is NaN or Inf.
        fit_below: scale the values by a power of two ``<= 1`` so that none exceeds this (float16
            storage); the scale (0-d float32) is returned, else ``None``.
        scratch: where span-sized temporaries live (default: the thread's
            :func:`~lightning_memcomp.compression.transforms.shared_scratch`); a codec passes the one its
            ``read`` uses (the transforms' buffer names start with ``t.``, none of these does).

    Returns:
        ``(coefficients, scale)``, or ``None`` (see ``check_finite``).
    """
    block = n if block is None else block
    value_dtype = dtype if value_dtype is None else value_dtype
    scratch = shared_scratch(device) if scratch is None else scratch
    total = rows * n
    if k == n:
        layout = "dense"
    elif k == 0:
        layout = "coo"
    else:
        layout = choose_layout(rows, n, k, _itemsize(value_dtype))
    # the host path writes every byte; the accelerator's adds into its slots
    coeffs = SparseCoefficients.allocate(layout, rows, n, k, value_dtype, dtype, device,
                                         zeroed=not _host_path(device))
    radix = n > min(SMALL_ROW, CHUNK_ELEMENTS) and 0 < k < n
    spans = plan_spans(total, block, unit, group=rows == 1 or not radix)
    inf_bits = _magnitude_bits(torch.tensor(float("inf"), dtype=dtype))
    largest: Tensor | None = None  # the largest magnitude's bits
    first: Tensor | None = None
    cached: Tensor | None = None
    wants_stats = check_finite or fit_below is not None
    width = inf_bits.element_size() * 8
    located: tuple[Tensor, Tensor, Tensor] | None = None  # the threshold, when the window holds it
    if radix and rows == 1:  # the first radix pass also finds the largest magnitude
        if width == 32 and _host_path(device):
            largest, located = _windowed_pass(read, spans, k, total, scratch)
        else:
            first = scratch.get("first", _BINS, torch.int64).zero_()
            for g0, g1 in spans:
                bits = _magnitude_bits(read(g0, g1), scratch)
                largest = _maximum(largest, bits.amax())
                _digit_count(first, bits, width, 0, None)
    elif wants_stats and len(spans) == 1 and not radix:
        cached = read(*spans[0])
        largest = _magnitude_bits(cached).amax()
    elif wants_stats:
        for g0, g1 in spans:
            largest = _maximum(largest, _magnitude_bits(read(g0, g1), scratch).amax())
    if check_finite and largest is not None and not bool(largest < inf_bits.to(largest.device)):
        return None
    scale = None
    if fit_below is not None:
        amax = (largest.view(dtype).float() if largest is not None
                else torch.zeros((), dtype=torch.float32, device=device))
        scale = torch.exp2(-torch.ceil(torch.log2(amax / fit_below)).clamp(min=0))
    writer = _Writer(coeffs, value_dtype, scale, scratch)
    if k == 0:
        return coeffs, scale
    if k == n:  # dense, every entry kept
        flat = coeffs.values.view(-1)
        for g0, g1 in spans:
            flat[g0:g1] = writer.cast(cached if cached is not None else read(g0, g1))
        return coeffs, scale
    if not radix:  # short rows: spans are whole rows
        for g0, g1 in spans:
            y = cached if cached is not None else read(g0, g1)
            writer.rows(g0 // n, y.reshape(-1, n))
        return coeffs, scale
    on_cpu = _host_path(device)
    count = torch.int32 if n < 1 << 31 else torch.int64
    for r in range(rows):
        row_spans = [(g0, g1) for g0, g1 in spans if g0 // n == r]
        if located is None:
            located = _radix_threshold(read, row_spans, k, width, first if r == 0 else None, scratch)
        threshold, need, all_ties = located
        located = None
        take_all = on_cpu and bool(all_ties)  # CPU: skip the tie count (no sync to spare on CUDA)
        offset: int | Tensor = 0 if on_cpu else torch.zeros((), dtype=torch.int64, device=device)
        ties = torch.zeros((), dtype=torch.int64, device=device)
        for g0, g1 in row_spans:
            y = read(g0, g1)
            bits = _magnitude_bits(y, scratch)
            keep = scratch.get("keep", bits.shape, torch.bool)
            if take_all:
                torch.ge(bits, threshold, out=keep)
            else:
                # ties: the first ``need`` entries equal to the threshold, in position order
                equal = torch.eq(bits, threshold, out=scratch.get("equal", bits.shape, torch.bool))
                rank = torch.cumsum(equal, 0, dtype=count, out=scratch.get("rank", bits.shape, count)).add_(ties)
                tied = torch.le(rank, need, out=scratch.get("tied", bits.shape, torch.bool)).logical_and_(equal)
                torch.gt(bits, threshold, out=keep).logical_or_(tied)
                ties = ties + torch.count_nonzero(equal)
            offset = writer.part(r, g0 - r * n, y, keep, offset)
    return coeffs, scale


def _maximum(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else torch.maximum(a, b)


def keep_topk(y: Tensor, k: int, *, value_dtype: torch.dtype | None = None) -> SparseCoefficients:
    """Keep the ``k`` largest-magnitude entries of each row of ``y`` (``[rows, n]``), stored cheaply.

    Vu et al. Eq. 10-12: ``Y_l = M_l * Y`` with ``M_l`` marking the ``k`` largest ``|y_i|``. The layout
    depends only on ``rows, n, k`` and the value itemsize, so choosing it needs no host sync. Works span by
    span (:func:`select_topk`): besides the result, temporaries stay within a few :data:`CHUNK_ELEMENTS`.

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
    flat = y.reshape(-1)  # a view when y is contiguous
    result = select_topk(lambda g0, g1: flat[g0:g1], rows, n, k, dtype=y.dtype, device=y.device,
                         value_dtype=value_dtype)
    assert result is not None
    return result[0]
