"""Band-limited FFT convolution: the functional core (Dziedzic et al., ICML 2019, Sec. 3).

A convolution (a correlation, as ``nn.Conv`` computes it) is evaluated in the frequency domain:
``Y = sum_c X_c * conj(W_oc)`` on a one-sided ``rfftn`` grid, with only a low-frequency block of the
spectrum kept for the input, the filter and (in backward) the output gradient. Only the compressed input
spectrum is held for backward; the compressed filter spectrum is recomputed from the weight (a parameter,
resident anyway) rather than held as in the paper's code. Because the discarded block is the same
Hermitian-symmetric set for every tensor, the band-limited backward is the exact gradient of the
band-limited forward.

Pure torch; no Lightning import. The complex multiply-accumulate over channels runs in the CUDA extension
``cuda/complex_mac.cu`` for CUDA tensors when it builds, and as a batched complex matmul otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_memcomp.kernels import use_cuda_kernel

__all__ = [
    "DEFAULT_FFT_SIZE",
    "FFT_SIZES",
    "BandLimitMemoryError",
    "LayerEstimate",
    "ON_LARGER",
    "estimate_conv",
    "SpectrumPlan",
    "band_limited_conv",
    "choose_energy_level",
    "complex_mac",
    "energy_level",
    "energy_levels",
    "read_levels",
    "fft_shape",
    "LowPassBlock",
    "lowpass_block",
    "lowpass_sizes",
    "next_fast_size",
    "realized_compression",
    "resolve_rates",
    "sizes_for_level",
]

#: how the FFT size of each spatial dim is chosen. ``"minimal"`` (the default) uses the padded input length
#: ``n + 2p``: the smallest size at which the forward and both gradients have no wrap-around (a correlation's
#: outputs ``0..n+2p-k`` and the input gradient's zero-padded output both fit), so it is exact and the cheapest
#: in memory. ``"fast"`` rounds that up to the next size whose prime factors are 2, 3, 5 and 7 (FFT libraries
#: are fastest there; at most a few percent larger). ``"linear"`` is the paper's length
#: ``L = n + 2p + max(out, k) - 1`` and ``"power2"`` rounds ``L`` up to a power of two (the paper's default):
#: both about double each dim, so ``2**d`` times the spectrum in ``d`` dims.
FFT_SIZES = ("power2", "linear", "minimal", "fast")
DEFAULT_FFT_SIZE = "minimal"
DEFAULT_COMPRESS_RATE = 50.0


def resolve_rates(compress_rate: float | None, preserve_energy: float | None) -> tuple[float | None, float | None]:
    """Validate the two exclusive modes; neither given means ``compress_rate=50`` (the paper's setting).

    Raises:
        ValueError: ``compress_rate`` outside ``[0, 100)``, ``preserve_energy`` outside ``(0, 100]``, or both.
    """
    if compress_rate is not None and preserve_energy is not None:
        raise ValueError(
            f"compress_rate={compress_rate!r} and preserve_energy={preserve_energy!r} were both given; "
            "use one of them (compress_rate: fixed share of the spectrum discarded; preserve_energy: "
            "share of input energy kept, chosen per batch)"
        )
    if preserve_energy is not None:
        if isinstance(preserve_energy, bool) or not isinstance(preserve_energy, (int, float)) or not (
            0 < preserve_energy <= 100
        ):
            raise ValueError(
                f"preserve_energy={preserve_energy!r} is not allowed; use a percent in (0, 100] "
                "(100 keeps the full spectrum)"
            )
        return None, float(preserve_energy)
    if compress_rate is None:
        return DEFAULT_COMPRESS_RATE, None
    if isinstance(compress_rate, bool) or not isinstance(compress_rate, (int, float)) or not (
        0 <= compress_rate < 100
    ):
        raise ValueError(
            f"compress_rate={compress_rate!r} is not allowed; use a percent in [0, 100) "
            "(0 keeps the full spectrum)"
        )
    return float(compress_rate), None


def _check_fft_size(fft_size: str) -> str:
    if not isinstance(fft_size, str) or fft_size not in FFT_SIZES:
        raise ValueError(f"fft_size={fft_size!r} is not allowed; use one of {', '.join(map(repr, FFT_SIZES))}")
    return fft_size


def next_fast_size(n: int) -> int:
    """The smallest ``m >= n`` whose prime factors are all 2, 3, 5 or 7 (sizes FFT libraries handle fastest)."""
    m = max(1, int(n))
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def fft_shape(
    input_size: Sequence[int],
    padding: Sequence[tuple[int, int]],
    kernel_size: Sequence[int],
    fft_size: str = DEFAULT_FFT_SIZE,
) -> tuple[int, ...]:
    """FFT grid per spatial dim (see :data:`FFT_SIZES`): ``n + pl + pr`` (``"minimal"``, exact), its next
    2-3-5-7-smooth size (``"fast"``), the paper's ``n + pl + pr + max(out, k) - 1`` (``"linear"``) or that
    rounded up to a power of two (``"power2"``).
    """
    _check_fft_size(fft_size)
    shape = []
    for n, (pl, pr), k in zip(input_size, padding, kernel_size):
        padded = n + pl + pr
        if padded < k:
            raise ValueError(f"input size {n} padded by ({pl}, {pr}) is smaller than the kernel size {k}")
        if fft_size == "minimal":
            shape.append(padded)
        elif fft_size == "fast":
            shape.append(next_fast_size(padded))
        else:
            length = padded + max(padded - k + 1, k) - 1
            shape.append(1 << (length - 1).bit_length() if fft_size == "power2" else length)
    return tuple(shape)


def _one_sided(shape: Sequence[int]) -> tuple[int, ...]:
    return (*shape[:-1], shape[-1] // 2 + 1)


def _halves(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(n // 2 + 1 for n in shape)


def lowpass_sizes(shape: Sequence[int], compress_rate: float) -> tuple[int, ...]:
    """The paper's block size per dim: ``m = int(half * ((100 - compress_rate) / 100) ** (1 / d))``.

    In 2-D this is ``int(half * sqrt((100 - rate) / 100))``; in 1-D the top ``rate`` percent of the one-sided
    coefficients are discarded. At least one frequency is always kept.
    """
    keep = (100.0 - compress_rate) / 100.0
    scale = keep ** (1.0 / len(shape))
    return tuple(max(1, min(h, int(h * scale))) for h in _halves(shape))


def sizes_for_level(shape: Sequence[int], level: int) -> tuple[int, ...]:
    """Block sizes of energy level ``level`` in ``1..T`` (``T = max(half)``): ``m_i = ceil(level * half_i / T)``."""
    halves = _halves(shape)
    top = max(halves)
    return tuple(max(1, -(-level * h // top)) for h in halves)


def _dim_indices(shape: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    # two-sided dims keep frequencies 0..m-1 and their negatives -(m-1)..-1; the last (one-sided) dim 0..m-1
    out = []
    last = len(shape) - 1
    for i, (n, m) in enumerate(zip(shape, sizes)):
        if i == last:
            out.append(list(range(min(m, n // 2 + 1))))
        else:
            positive = min(m, n)
            negative = max(0, min(m - 1, n - positive))
            out.append(list(range(positive)) + list(range(n - negative, n)))
    return out


def realized_compression(shape: Sequence[int], sizes: Sequence[int]) -> float:
    """Fraction of the one-sided spectral coefficients that the block ``sizes`` discards."""
    kept = math.prod(len(ix) for ix in _dim_indices(shape, sizes))
    return 1.0 - kept / math.prod(_one_sided(shape))


@dataclass(frozen=True)
class LowPassBlock:
    """The kept low-frequency block: a product of per-dim frequency ranges (so it stays a dense block).

    Two-sided dim ``i`` keeps frequencies ``0..positive[i]-1`` and ``-negative[i]..-1``; the last (one-sided)
    dim keeps ``0..last-1``. ``compression`` is the fraction of one-sided coefficients dropped.
    """

    fft_shape: tuple[int, ...]
    sizes: tuple[int, ...]
    positive: tuple[int, ...]
    negative: tuple[int, ...]
    last: int
    compression: float

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the kept block."""
        return (*(p + n for p, n in zip(self.positive, self.negative)), self.last)

    @property
    def kept(self) -> int:
        """Number of kept one-sided coefficients."""
        return math.prod(self.shape)


def lowpass_block(shape: Sequence[int], sizes: Sequence[int]) -> LowPassBlock:
    """The block of frequencies ``|f_i| < m_i`` in every two-sided dim and ``f < m`` in the last."""
    dims = _dim_indices(shape, sizes)
    positive = tuple(min(m, n) for m, n in zip(sizes[:-1], shape[:-1]))
    negative = tuple(len(ix) - p for ix, p in zip(dims[:-1], positive))
    compression = realized_compression(shape, sizes)
    return LowPassBlock(tuple(shape), tuple(sizes), positive, negative, len(dims[-1]), compression)


def energy_levels(shape: Sequence[int], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, int]:
    """Per coefficient of the one-sided spectrum: the smallest level whose block holds it, and its weight.

    Returns ``(levels, weights, T)``: ``levels`` (long, flattened, values in ``1..T``); ``weights`` counts a
    one-sided coefficient twice when its conjugate twin is implicit (Parseval), once for DC and Nyquist.
    """
    halves = _halves(shape)
    top = max(halves)
    level = torch.zeros((), dtype=torch.long)
    last = len(shape) - 1
    for i, (n, h) in enumerate(zip(shape, halves)):
        freq = torch.arange(h if i == last else n)
        dist = freq if i == last else torch.minimum(freq, n - freq)
        t = dist * top // h + 1
        view = [1] * len(shape)
        view[i] = -1
        level = torch.maximum(level, t.view(view))
    n_last = shape[-1]
    col = torch.arange(n_last // 2 + 1)
    weights = torch.where((col == 0) | (2 * col == n_last), 1.0, 2.0)
    weights = weights.expand(_one_sided(shape)).reshape(-1)
    return level.expand(_one_sided(shape)).reshape(-1).to(device), weights.to(device), top


def energy_level(spectrum: Tensor, levels: Tensor, weights: Tensor, top: int, preserve_energy: float) -> Tensor:
    """Smallest level whose block holds ``preserve_energy`` percent of the spectrum's energy, on the device.

    ``spectrum`` is ``[..., *one_sided]``; energy is summed over the leading (batch, channel) dims. All
    levels are evaluated at once (a cumulative sum over a histogram of levels) and the answer stays on the
    tensor's device as a 0-dim long tensor: no host sync (the paper's code synced on every probe of a
    binary search). Read it with :func:`read_levels`.
    """
    spatial = levels.numel()
    power = torch.view_as_real(spectrum).square().sum(-1).reshape(-1, spatial).sum(0)
    per_level = torch.zeros(top + 1, dtype=torch.float64, device=power.device)
    per_level.index_add_(0, levels, (power * weights).to(torch.float64))
    cumulative = per_level.cumsum(0)
    share = cumulative / cumulative[-1].clamp_min(torch.finfo(torch.float64).tiny)
    target = torch.tensor([preserve_energy / 100.0 - 1e-12], dtype=torch.float64, device=power.device)
    return torch.searchsorted(share, target).clamp_(1, top).squeeze(0)


def read_levels(levels: Tensor) -> list[int]:
    """Copy device-side levels to the host: the one host sync of the energy mode (counted in the tests)."""
    return [int(v) for v in levels.cpu().tolist()]


def choose_energy_level(
    spectrum: Tensor, levels: Tensor, weights: Tensor, top: int, preserve_energy: float
) -> int:
    """:func:`energy_level` read on the host at once (one host sync)."""
    return read_levels(energy_level(spectrum, levels, weights, top, preserve_energy).view(1))[0]


# -- estimates: what a conversion holds and costs, before it runs ------------------------------------------

#: what a converter does where a band-limited layer would hold more for backward than the convolution it
#: replaces: ``"warn"`` (default), ``"error"`` (refuse, with the estimate) or ``"ignore"``
ON_LARGER = ("warn", "error", "ignore")


class BandLimitMemoryError(RuntimeError):
    """A band-limited conversion would hold more for backward than the convolutions it replaces
    (raised with ``on_larger="error"``; the message holds the estimate)."""


def _check_on_larger(on_larger: str) -> str:
    if not isinstance(on_larger, str) or on_larger not in ON_LARGER:
        raise ValueError(f"on_larger={on_larger!r} is not allowed; use one of {', '.join(map(repr, ON_LARGER))}")
    return on_larger


def _mib(n: float) -> str:
    return f"{n / 2**20:.3g} MiB"


@dataclass(frozen=True)
class LayerEstimate:
    """What one band-limited convolution holds for backward and roughly costs at one input shape.

    ``held_bytes``: the compressed input spectrum kept for backward (complex, ``kept`` coefficients per sample
    and channel; for ``preserve_energy`` an upper bound, the whole one-sided spectrum, since the block is chosen
    per batch). ``conv_bytes``: the input the convolution it replaces saves for backward. ``input_shared``: another
    operation saves that input for backward too (a ReLU keeps its output, which is the next convolution's input),
    so converting frees nothing and the spectrum is added on top; ``None`` when not known (only a probe forward
    pass with an example input finds it out). ``transient_bytes``: the largest spectrum formed during the forward
    (freed at its end).
    ``spectral_macs``/``direct_macs``: complex multiply-accumulates of the frequency-domain product against the
    real ones of the direct convolution (FFTs not counted).
    """

    name: str
    input_shape: tuple[int, ...]
    out_channels: int
    fft_shape: tuple[int, ...]
    kept: int
    compression: float | None
    held_bytes: int
    conv_bytes: int
    transient_bytes: int
    spectral_macs: int
    direct_macs: int
    input_shared: bool | None = None

    @property
    def ratio(self) -> float:
        """Held bytes over the convolution's saved input (> 1: the band-limited layer holds more)."""
        return self.held_bytes / self.conv_bytes if self.conv_bytes else float("inf")

    @property
    def freed_bytes(self) -> int:
        """What converting frees: the convolution's saved input, unless another operation keeps it."""
        return 0 if self.input_shared else self.conv_bytes

    @property
    def added_bytes(self) -> int:
        """Net change of the bytes held for backward (negative: the conversion saves memory)."""
        return self.held_bytes - self.freed_bytes

    @property
    def larger(self) -> bool:
        """The spectrum is larger than the input the convolution saves (whoever else keeps that input)."""
        return self.held_bytes > self.conv_bytes

    def describe(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        fft = "x".join(map(str, self.fft_shape))
        return (
            f"{self.name or '<layer>'} at input {shape}: FFT {fft}, holds {_mib(self.held_bytes)} of spectrum for "
            f"backward vs {_mib(self.conv_bytes)} for the convolution ({self.ratio:.2f}x"
            + (", whose input another layer keeps anyway: all of it is added" if self.input_shared else "")
            + f"), forward transient {_mib(self.transient_bytes)}"
        )


def estimate_conv(
    input_shape: Sequence[int],
    dtype: torch.dtype,
    out_channels: int,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[tuple[int, int]],
    compress_rate: float | None,
    fft_size: str = DEFAULT_FFT_SIZE,
    name: str = "",
) -> LayerEstimate:
    """The :class:`LayerEstimate` of a band-limited correlation of an input ``[B, C, *S]`` (no tensor is made).

    ``compress_rate=None`` means ``preserve_energy`` mode: the held figure is then the whole-spectrum bound.
    """
    b, c, *size = (int(v) for v in input_shape)
    shape = fft_shape(size, padding, kernel_size, fft_size)
    if compress_rate is not None:
        block = lowpass_block(shape, lowpass_sizes(shape, compress_rate))
        kept, compression = block.kept, block.compression
    else:
        kept, compression = math.prod(_one_sided(shape)), None
    real = torch.empty((), dtype=dtype).element_size()
    complex_bytes = 16 if dtype == torch.float64 else 8  # half precision is computed in float32
    out = [(n + pl + pr - k) // s + 1 for n, (pl, pr), k, s in zip(size, padding, kernel_size, stride)]
    full_one_sided = math.prod(_one_sided(shape))
    return LayerEstimate(
        name=name,
        input_shape=(b, c, *size),
        out_channels=int(out_channels),
        fft_shape=shape,
        kept=kept,
        compression=compression,
        held_bytes=b * c * kept * complex_bytes,
        conv_bytes=b * c * math.prod(size) * real,
        transient_bytes=b * max(c, int(out_channels)) * full_one_sided * complex_bytes,
        spectral_macs=b * c * int(out_channels) * kept,
        direct_macs=b * c * int(out_channels) * math.prod(out) * math.prod(kernel_size),
    )


# -- the complex multiply-accumulate over channels --------------------------------------------------------


def _torch_mac(a: Tensor, b: Tensor, conj_a: bool, conj_b: bool) -> Tensor:
    return torch.matmul(a.conj() if conj_a else a, b.conj() if conj_b else b)


def complex_mac(a: Tensor, b: Tensor, conj_a: bool = False, conj_b: bool = False) -> Tensor:
    """``out[k, i, j] = sum_r opA(a[k, i, r]) * opB(b[k, r, j])``, ``opX`` = conj when ``conj_x``.

    Uses the CUDA extension ``complex_mac`` for CUDA tensors (per ``MEMCOMP_KERNELS``), else a batched
    complex matmul. ``a`` and ``b`` may be strided views (e.g. transposes).
    """
    ext = use_cuda_kernel("complex_mac", a)
    if ext is not None:
        return ext.complex_mac(a, b, conj_a, conj_b)
    return _torch_mac(a, b, conj_a, conj_b)


# -- plans: the geometry of one layer at one input size ----------------------------------------------------


@dataclass
class SpectrumPlan:
    """FFT geometry of one layer for one input size, and the kept block(s)."""

    input_size: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    fft_shape: tuple[int, ...]
    out_full: tuple[int, ...]
    out: tuple[int, ...]
    device: torch.device
    #: compress_rate mode: the fixed block
    block: LowPassBlock | None = None
    #: preserve_energy mode: the level map and a cache of blocks per level
    energy: tuple[Tensor, Tensor, int] | None = None
    #: preserve_energy mode: the level applied (read on the host), and the one measured on the last batch
    #: and not read yet (a device scalar, see :class:`~lightning_memcomp.bandlimit.layers.EnergyLevels`)
    level: int | None = None
    pending: Tensor | None = field(default=None, repr=False)
    _by_level: dict[int, LowPassBlock] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        input_size: Sequence[int],
        kernel_size: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[tuple[int, int]],
        fft_size: str,
        compress_rate: float | None,
        device: torch.device,
    ) -> SpectrumPlan:
        shape = fft_shape(input_size, padding, kernel_size, fft_size)
        out_full = tuple(n + pl + pr - k + 1 for n, (pl, pr), k in zip(input_size, padding, kernel_size))
        out = tuple((f - 1) // s + 1 for f, s in zip(out_full, stride))
        plan = cls(tuple(input_size), tuple(kernel_size), tuple(stride), tuple(padding), shape, out_full, out, device)
        if compress_rate is not None:
            plan.block = lowpass_block(shape, lowpass_sizes(shape, compress_rate))
        else:
            plan.energy = energy_levels(shape, device)
        return plan

    def block_for_level(self, level: int) -> LowPassBlock:
        """The kept block of energy level ``level`` (cached)."""
        cached = self._by_level.get(level)
        if cached is None:
            cached = lowpass_block(self.fft_shape, sizes_for_level(self.fft_shape, level))
            self._by_level[level] = cached
        return cached


# -- the autograd Function ---------------------------------------------------------------------------------


def _keep_rows(t: Tensor, dim: int, n: int, positive: int, negative: int) -> Tensor:
    if positive + negative == n:
        return t
    head = t.narrow(dim, 0, positive)
    return torch.cat([head, t.narrow(dim, n - negative, negative)], dim) if negative else head.contiguous()


def _spectrum(t: Tensor, block: LowPassBlock) -> Tensor:
    """Kept block of ``rfftn(t, s=fft_shape)`` over the trailing dims, computed dim by dim (a pruned FFT).

    The last dim is transformed first and cut to the kept columns, so the other dims transform only those;
    zero padding up to the FFT size is implicit (``n=``). ``[P, Q, *S] -> [P, Q, *block.shape]``.
    """
    d = len(block.fft_shape)
    t = torch.fft.rfft(t, n=block.fft_shape[-1], dim=-1)[..., : block.last]
    for i in reversed(range(d - 1)):
        dim = t.dim() - d + i
        t = torch.fft.fft(t, n=block.fft_shape[i], dim=dim)
        t = _keep_rows(t, dim, block.fft_shape[i], block.positive[i], block.negative[i])
    return t


def _signal(t: Tensor, block: LowPassBlock, keep: Sequence[slice]) -> Tensor:
    """Inverse of :func:`_spectrum` restricted to the positions ``keep`` (one slice per dim), contiguous.

    No full-size grid is formed: along a two-sided dim the negative frequencies are moved in front of the
    positive ones (a shift by ``negative``), ``ifft`` zero-fills the rest, and the shift is undone by a phase
    ramp on the kept positions only; the last dim's missing columns are zero-filled by ``irfft`` itself.
    """
    d = len(block.fft_shape)
    for i in range(d - 1):
        dim = t.dim() - d + i
        n, pos, neg = block.fft_shape[i], block.positive[i], block.negative[i]
        if neg and pos + neg < n:
            t = torch.cat([t.narrow(dim, pos, neg), t.narrow(dim, 0, pos)], dim)
        t = torch.fft.ifft(t, n=n, dim=dim)[(slice(None),) * dim + (keep[i],)]
        if neg and pos + neg < n:
            positions = torch.arange(n, device=t.device, dtype=torch.float64)[keep[i]]
            ramp = torch.polar(torch.ones_like(positions), positions * (-2 * math.pi * neg / n)).to(t.dtype)
            t = t * ramp.view(-1, *([1] * (t.dim() - dim - 1)))
    t = torch.fft.irfft(t, n=block.fft_shape[-1], dim=-1)[..., keep[-1]]
    return t.contiguous()


def _to_frequency_major(t: Tensor) -> Tensor:
    """``[P, Q, *block]`` -> ``[K, P, Q]`` (contiguous), the layout of the multiply-accumulate."""
    p, q = t.shape[:2]
    return t.reshape(p * q, -1).t().contiguous().view(-1, p, q)


def _from_frequency_major(t: Tensor, block_shape: Sequence[int]) -> Tensor:
    """``[K, P, Q]`` -> ``[P, Q, *block]`` (contiguous)."""
    k, p, q = t.shape
    return t.reshape(k, p * q).t().reshape(p, q, *block_shape)


def _strided(sizes: Sequence[int], steps: Sequence[int], starts: Sequence[int] | None = None) -> list[slice]:
    starts = starts or [0] * len(sizes)
    return [slice(b, b + (n - 1) * s + 1, s) for b, n, s in zip(starts, sizes, steps)]


class _BandLimitedConvFunction(torch.autograd.Function):
    """Band-limited correlation; holds only the compressed input spectrum (and the weight) for backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        plan: SpectrumPlan,
        block: LowPassBlock | None,
        mac: Callable[..., Tensor],
        choose: Callable[[Tensor], LowPassBlock] | None,
    ) -> Tensor:
        d = len(plan.fft_shape)
        out_channels = weight.shape[0]
        left = [pl for pl, _ in plan.padding]
        if any(left):
            pads: list[int] = []
            for pl in reversed(left):
                pads += [pl, 0]
            x = F.pad(x, pads)
        if choose is not None:
            # preserve_energy: the block depends on the whole input spectrum
            full = torch.fft.rfftn(x, s=plan.fft_shape, dim=tuple(range(-d, 0)))
            block = choose(full)
            for i in range(d - 1):
                full = _keep_rows(full, 2 + i, block.fft_shape[i], block.positive[i], block.negative[i])
            x_block = full[..., : block.last]
            del full
        else:
            assert block is not None
            x_block = _spectrum(x, block)
        x_kept = _to_frequency_major(x_block)  # [K, B, C]
        del x_block
        w_kept = _to_frequency_major(_spectrum(weight, block))  # [K, O, C]
        y_kept = mac(x_kept, w_kept.transpose(1, 2), False, True)  # [K, B, O]
        del w_kept
        y = _signal(_from_frequency_major(y_kept, block.shape), block, _strided(plan.out, plan.stride))
        del y_kept
        if bias is not None:
            y += bias.view(1, out_channels, *([1] * d))
        needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Only the compressed input spectrum is held for backward (and only when grad-weight needs it). The
        # filter spectrum, needed by grad-input, is recomputed from the weight, which is resident anyway:
        # for deep layers [K, O, C] complex is many times the activations it would otherwise add.
        ctx.save_for_backward(x_kept if needs_w else None, weight if needs_x else None)
        ctx.plan, ctx.block, ctx.mac = plan, block, mac
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x_kept, weight = ctx.saved_tensors
        plan: SpectrumPlan = ctx.plan
        block: LowPassBlock = ctx.block
        mac = ctx.mac
        d = len(plan.fft_shape)
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if needs_b:
            grad_b = grad_out.sum(dim=(0, *range(2, 2 + d)))
        if needs_x or needs_w:
            g = grad_out
            if any(s > 1 for s in plan.stride):
                # the strided output is the full-resolution one subsampled: zero-fill the skipped positions
                g = grad_out.new_zeros(*grad_out.shape[:2], *plan.out_full)
                g[(Ellipsis, *_strided(plan.out, plan.stride))] = grad_out
            g_kept = _to_frequency_major(_spectrum(g, block))  # [K, B, O]
            del g
            shape = block.shape
            if needs_x:
                w_kept = _to_frequency_major(_spectrum(weight, block))  # [K, O, C]
                gx = mac(g_kept, w_kept, False, False)  # [K, B, C]
                del w_kept
                starts = [pl for pl, _ in plan.padding]
                grad_x = _signal(_from_frequency_major(gx, shape), block, _strided(plan.input_size, [1] * d, starts))
            if needs_w:
                gw = mac(g_kept.transpose(1, 2), x_kept, True, False)  # [K, O, C]
                grad_w = _signal(_from_frequency_major(gw, shape), block, _strided(plan.kernel_size, [1] * d))
        return grad_x, grad_w, grad_b, None, None, None, None


def band_limited_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    plan: SpectrumPlan,
    block: LowPassBlock | None,
    choose: Callable[[Tensor], LowPassBlock] | None = None,
) -> Tensor:
    """Band-limited correlation of ``x`` ``[B, C, *S]`` with ``weight`` ``[O, C, *k]`` under ``plan``.

    ``block`` is the kept low-pass block (the whole spectrum gives an exact FFT convolution); ``choose``,
    when given, picks it instead from the input spectrum ``[B, C, *one_sided]`` (preserve_energy).
    Half-precision inputs are computed in float32 (``torch.fft`` has no general fp16/bf16 support) and
    returned in the input's dtype.
    """
    if block is None and choose is None:
        raise ValueError("band_limited_conv needs a block or a choose function")
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        x = x.float()
        weight = weight.float()
        bias = bias.float() if bias is not None else None
    ext = use_cuda_kernel("complex_mac", x)
    mac = ext.complex_mac if ext is not None else _torch_mac
    with torch.autocast(device_type=x.device.type, enabled=False):
        y = _BandLimitedConvFunction.apply(x, weight, bias, plan, block, mac, choose)
    return y.to(dtype)
