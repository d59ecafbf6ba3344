"""Band-limited convolution layers (Dziedzic et al., ICML 2019): 1-D, 2-D and 3-D, with ``from_conv``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.nn import init

from lightning_memcomp.bandlimit.functional import (
    LowPassBlock,
    SpectrumPlan,
    _check_fft_size,
    band_limited_conv,
    choose_energy_level,
    fft_shape,
    lowpass_sizes,
    realized_compression,
    resolve_rates,
)

__all__ = [
    "BandLimitedConv1d",
    "BandLimitedConv2d",
    "BandLimitedConv3d",
    "UnsupportedConvError",
]

Size = Union[int, Sequence[int]]


class UnsupportedConvError(ValueError):
    """A convolution option the band-limited FFT path does not implement (groups, dilation, padding mode)."""


def _tuple(value: Size, d: int, option: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * d
    try:
        out = tuple(int(v) for v in value)  # type: ignore[union-attr]
    except TypeError:
        raise ValueError(f"{option}={value!r} is not an int or a sequence of {d} ints") from None
    if len(out) != d:
        raise ValueError(f"{option}={value!r} must have {d} entries (one per spatial dim)")
    return out


class _BandLimitedConvNd(nn.Module):
    """A convolution evaluated in the frequency domain with the high-frequency block discarded.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, bias: as ``nn.ConvNd``; ``padding`` may be
            an int, a tuple, ``"same"`` (stride 1 only; the extra pixel of an even kernel goes right, as in
            PyTorch) or ``"valid"``.
        dilation, groups, padding_mode: accepted for signature compatibility; only ``1``, ``1`` and
            ``"zeros"`` are implemented, anything else raises :class:`UnsupportedConvError`.
        compress_rate: percent of the one-sided spectrum discarded, in ``[0, 100)``; the kept block has
            ``m = int(half * ((100 - rate) / 100) ** (1 / d))`` frequencies per dim (paper, Sec. 3).
            Default 50 when ``preserve_energy`` is not given either.
        preserve_energy: percent of the input spectrum's energy kept, in ``(0, 100]``; the smallest block
            holding it is chosen per forward pass (one host sync). Exclusive with ``compress_rate``.
        fft_size: ``"power2"`` (paper), ``"linear"`` (the paper's length, not rounded) or ``"minimal"``
            (padded input size); see :data:`~lightning_memcomp.bandlimit.functional.FFT_SIZES`.

    After each forward pass :attr:`realized_compression` holds the fraction of spectral coefficients that
    were actually dropped (it differs from ``compress_rate`` by the integer truncation of ``m``).
    """

    _dims: int = 0
    _conv_type: type[nn.Module] = nn.Module

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Size,
        stride: Size = 1,
        padding: Size | str = 0,
        dilation: Size = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        compress_rate: float | None = None,
        preserve_energy: float | None = None,
        fft_size: str = "power2",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        d = self._dims
        name = type(self).__name__
        if groups != 1:
            raise UnsupportedConvError(f"{name}: groups={groups!r} is not supported; only groups=1 is")
        if any(v != 1 for v in _tuple(dilation, d, "dilation")):
            raise UnsupportedConvError(f"{name}: dilation={dilation!r} is not supported; only dilation=1 is")
        if padding_mode != "zeros":
            raise UnsupportedConvError(
                f"{name}: padding_mode={padding_mode!r} is not supported; only padding_mode='zeros' is"
            )
        self.compress_rate, self.preserve_energy = resolve_rates(compress_rate, preserve_energy)
        self.fft_size = _check_fft_size(fft_size)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _tuple(kernel_size, d, "kernel_size")
        self.stride = _tuple(stride, d, "stride")
        if any(k < 1 for k in self.kernel_size) or any(s < 1 for s in self.stride):
            raise ValueError(f"{name}: kernel_size={kernel_size!r} and stride={stride!r} must be positive")
        if isinstance(padding, str):
            if padding == "valid":
                pairs = tuple((0, 0) for _ in range(d))
            elif padding == "same":
                if any(s != 1 for s in self.stride):
                    raise ValueError(f"{name}: padding='same' needs stride=1, got stride={stride!r}")
                pairs = tuple(((k - 1) // 2, (k - 1) - (k - 1) // 2) for k in self.kernel_size)
            else:
                raise ValueError(f"{name}: padding={padding!r} is not allowed; use an int, a tuple, 'same' or 'valid'")
            self.padding: tuple[int, ...] | str = padding
        else:
            self.padding = _tuple(padding, d, "padding")
            if any(p < 0 for p in self.padding):
                raise ValueError(f"{name}: padding={padding!r} must be >= 0")
            pairs = tuple((p, p) for p in self.padding)
        self._padding_pairs: tuple[tuple[int, int], ...] = pairs
        self.dilation = (1,) * d
        self.groups = 1
        self.padding_mode = "zeros"
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.out_channels, self.in_channels, *self.kernel_size, **factory))
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        if self.weight.device.type != "meta":
            self.reset_parameters()
        #: fraction of one-sided spectral coefficients dropped in the last forward pass
        self.realized_compression: float | None = None
        self._plans: dict[tuple[Any, ...], SpectrumPlan] = {}

    def reset_parameters(self) -> None:
        """The same initialization as ``nn.ConvNd``."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * math.prod(self.kernel_size)
            bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
            init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Module,
        compress_rate: float | None = None,
        preserve_energy: float | None = None,
        *,
        fft_size: str = "power2",
    ) -> _BandLimitedConvNd:
        """Band-limit ``conv``, keeping its weight and bias (the same ``Parameter`` objects, not copies).

        Raises:
            TypeError: ``conv`` is not an ``nn.Conv{d}d``.
            UnsupportedConvError: ``conv`` uses groups, dilation or a padding mode other than zeros.
            ValueError: invalid ``compress_rate``/``preserve_energy``/``fft_size``.
        """
        if not isinstance(conv, cls._conv_type):
            raise TypeError(
                f"{cls.__name__}.from_conv needs an nn.{cls._conv_type.__name__}, got {type(conv).__name__}"
            )
        new = cls(
            conv.in_channels,  # type: ignore[arg-type]
            conv.out_channels,  # type: ignore[arg-type]
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,  # type: ignore[arg-type]
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,  # type: ignore[arg-type]
            compress_rate=compress_rate,
            preserve_energy=preserve_energy,
            fft_size=fft_size,
            device="meta",
        )
        new.weight = conv.weight  # type: ignore[assignment]
        new.bias = conv.bias  # type: ignore[assignment]
        return new

    def plan(self, input_size: Sequence[int], device: torch.device | str = "cpu") -> SpectrumPlan:
        """The FFT geometry and kept block for a spatial input size (cached per size and device)."""
        device = torch.device(device)
        key = (tuple(input_size), device)
        plan = self._plans.get(key)
        if plan is None:
            plan = SpectrumPlan.build(
                tuple(input_size), self.kernel_size, self.stride, self._padding_pairs, self.fft_size,
                self.compress_rate, device,
            )
            self._plans[key] = plan
        return plan

    def compression_for(self, input_size: Sequence[int]) -> float:
        """Realized compression at a spatial input size (``compress_rate`` mode; energy mode is per batch)."""
        if self.compress_rate is None:
            raise ValueError(
                f"{type(self).__name__} uses preserve_energy={self.preserve_energy}: its compression depends "
                "on each batch; read realized_compression after a forward pass"
            )
        shape = fft_shape(input_size, self._padding_pairs, self.kernel_size, self.fft_size)
        return realized_compression(shape, lowpass_sizes(shape, self.compress_rate))

    def forward(self, x: Tensor) -> Tensor:
        d = self._dims
        if x.dim() != d + 2:
            raise ValueError(
                f"{type(self).__name__} expects a [batch, channels, {d} spatial dims] input, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[1]} channels, expected {self.in_channels}")
        plan = self.plan(x.shape[2:], x.device)
        if plan.energy is None:
            assert plan.block is not None
            self.realized_compression = plan.block.compression
            return band_limited_conv(x, self.weight, self.bias, plan, plan.block)
        return band_limited_conv(x, self.weight, self.bias, plan, None, choose=self._energy_chooser(plan))

    def _energy_chooser(self, plan: SpectrumPlan) -> Callable[[Tensor], LowPassBlock]:
        """Picks the smallest block holding ``preserve_energy`` percent of this batch's input energy."""
        assert plan.energy is not None and self.preserve_energy is not None
        levels, weights, top = plan.energy
        preserve_energy = self.preserve_energy

        def choose(spectrum: Tensor) -> LowPassBlock:
            # zero padding only shifts the signal: the energy per frequency is that of the input
            level = top if preserve_energy >= 100 else choose_energy_level(
                spectrum, levels, weights, top, preserve_energy
            )
            block = plan.block_for_level(level)
            self.realized_compression = block.compression
            return block

        return choose

    def extra_repr(self) -> str:
        mode = (
            f"compress_rate={self.compress_rate:g}" if self.compress_rate is not None
            else f"preserve_energy={self.preserve_energy:g}"
        )
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding!r}, {mode}, fft_size={self.fft_size!r}"
        )
        if self.bias is None:
            s += ", bias=False"
        return s

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_plans"] = {}  # cached index tensors are rebuilt on demand
        return state


class BandLimitedConv1d(_BandLimitedConvNd):
    """Band-limited ``nn.Conv1d``: the top ``compress_rate`` percent of one-sided frequencies are discarded."""

    _dims = 1
    _conv_type = nn.Conv1d


class BandLimitedConv2d(_BandLimitedConvNd):
    """Band-limited ``nn.Conv2d`` (Dziedzic et al., ICML 2019): a low-pass block of the 2-D spectrum is kept."""

    _dims = 2
    _conv_type = nn.Conv2d


class BandLimitedConv3d(_BandLimitedConvNd):
    """Band-limited ``nn.Conv3d`` (the 2-D scheme extended to volumes, e.g. MONAI networks)."""

    _dims = 3
    _conv_type = nn.Conv3d
