"""Band-limited convolution layers (Dziedzic et al., ICML 2019): 1-D, 2-D and 3-D, with ``from_conv``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.nn import init

from lightning_memcomp.bandlimit.functional import (
    DEFAULT_FFT_SIZE,
    BandLimitMemoryError,
    LayerEstimate,
    LowPassBlock,
    SpectrumPlan,
    _check_fft_size,
    _check_on_larger,
    band_limited_conv,
    energy_level,
    estimate_conv,
    fft_shape,
    lowpass_sizes,
    read_levels,
    realized_compression,
    resolve_rates,
)

__all__ = [
    "BandLimitedConv1d",
    "BandLimitedConv2d",
    "BandLimitedConv3d",
    "EnergyLevels",
    "UnsupportedConvError",
    "share_energy_levels",
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


class EnergyLevels:
    """The ``preserve_energy`` levels of a group of band-limited layers, read with one host sync per batch.

    A kept block's size must be known on the host, and each layer's input exists only once the layers
    before it have run, so reading every layer's level as soon as it is measured costs one host sync per
    layer (the paper's code: one per probe of a binary search). Instead, each layer measures the level of
    its input on the device in every forward pass and leaves it here; the next forward pass of any layer of
    the group reads all of them with one sync (:meth:`flush`), and each layer applies its level from then on.
    So every batch chooses a level per layer, applied from the following batch (the delayed scaling of
    fp8 training); the first forward pass at a new input size has nothing to apply yet and reads its own
    level at once (one sync per layer, once). Measurements taken during backward (activation
    checkpointing recomputing a forward) are not kept, so a recomputed forward uses the same block.

    :func:`~lightning_memcomp.bandlimit.band_limit` gives every layer of a model one group; a layer built by
    hand has its own until :func:`share_energy_levels` is called on its model.
    """

    def __init__(self) -> None:
        self._pending: list[SpectrumPlan] = []
        #: host syncs made by :meth:`flush` so far (one per call with pending levels)
        self.reads = 0

    def submit(self, plan: SpectrumPlan, level: Tensor) -> None:
        """Keep ``level`` (a device scalar measured in this forward pass) to be read with the others."""
        if plan.pending is None:
            self._pending.append(plan)
        plan.pending = level

    def flush(self) -> None:
        """Read every pending level (one host sync per device) and make it the level each layer applies."""
        plans, self._pending = self._pending, []
        by_device: dict[torch.device, list[SpectrumPlan]] = {}
        for plan in plans:
            if plan.pending is not None:
                by_device.setdefault(plan.pending.device, []).append(plan)
        for group in by_device.values():
            values = read_levels(torch.stack([p.pending for p in group]))  # type: ignore[misc]
            self.reads += 1
            for plan, value in zip(group, values):
                plan.level, plan.pending = value, None

    def __getstate__(self) -> dict[str, Any]:
        return {"_pending": [], "reads": 0}


def share_energy_levels(model: nn.Module) -> EnergyLevels:
    """Give every band-limited layer of ``model`` one :class:`EnergyLevels` (one host sync per batch)."""
    shared = EnergyLevels()
    for module in model.modules():
        if isinstance(module, _BandLimitedConvNd):
            module.energy_levels = shared
            for plan in module._plans.values():
                plan.pending = None  # a measurement left in the former group is dropped, not read
    return shared


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
            holding it is measured on every batch and applied from the next one, the levels of all layers
            sharing an :class:`EnergyLevels` read with one host sync per batch (see there). Exclusive with
            ``compress_rate``.
        fft_size: ``"minimal"`` (default: the padded input size, the smallest exact grid), ``"fast"`` (that
            rounded up to a 2-3-5-7-smooth size), ``"linear"`` (the paper's length) or ``"power2"`` (the paper's
            default, about ``2**d`` times the spectrum); see
            :data:`~lightning_memcomp.bandlimit.functional.FFT_SIZES`.
        on_larger: at the first forward pass at each input size, before any FFT runs, the layer estimates
            the spectrum it will hold for backward; where that is more than the input an ``nn.ConvNd`` would
            save, ``"warn"`` (default) warns with the estimate, ``"error"`` raises
            :class:`~lightning_memcomp.bandlimit.functional.BandLimitMemoryError`, ``"ignore"`` does neither.

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
        fft_size: str = DEFAULT_FFT_SIZE,
        on_larger: str = "warn",
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
        self.on_larger = _check_on_larger(on_larger)
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
        #: spatial input sizes already checked against ``on_larger`` (by the converter's estimate or here)
        self._checked_sizes: set[tuple[int, ...]] = set()
        #: the layer's name in its model (set by :func:`~lightning_memcomp.bandlimit.band_limit`, for messages)
        self.qualified_name = ""
        #: preserve_energy mode: the group whose levels are read together (see :class:`EnergyLevels`)
        self.energy_levels = EnergyLevels()

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
        fft_size: str = DEFAULT_FFT_SIZE,
        on_larger: str = "warn",
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
            on_larger=on_larger,
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

    def estimate(self, input_shape: Sequence[int], dtype: torch.dtype = torch.float32, name: str = "") -> LayerEstimate:
        """What this layer holds for backward and roughly costs on an input ``[B, C, *S]`` (nothing is run).

        In ``preserve_energy`` mode the held figure is the whole-spectrum bound (the block is chosen per batch).
        """
        return estimate_conv(
            input_shape, dtype, self.out_channels, self.kernel_size, self.stride, self._padding_pairs,
            self.compress_rate, self.fft_size, name,
        )

    def _check_memory(self, x: Tensor) -> None:
        size = tuple(x.shape[2:])
        self._checked_sizes.add(size)
        if self.on_larger == "ignore":
            return
        est = self.estimate(x.shape, x.dtype, name=self.qualified_name or type(self).__name__)
        if not est.larger:
            return
        message = (
            f"{est.describe()}: the band-limited layer holds more for backward than the convolution it replaces "
            f"(fft_size={self.fft_size!r}, "
            + (f"compress_rate={self.compress_rate:g}" if self.compress_rate is not None
               else f"preserve_energy={self.preserve_energy:g}, an upper bound")
            + "). A higher compress_rate"
            + (", fft_size='minimal'" if self.fft_size != "minimal" else "")
            + " or leaving this layer a plain convolution (modules=) avoids it; on_larger='ignore' silences this check"
        )
        if self.on_larger == "error":
            raise BandLimitMemoryError(message)
        warnings.warn(message, stacklevel=3)

    def forward(self, x: Tensor) -> Tensor:
        d = self._dims
        if x.dim() != d + 2:
            raise ValueError(
                f"{type(self).__name__} expects a [batch, channels, {d} spatial dims] input, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[1]} channels, expected {self.in_channels}")
        if tuple(x.shape[2:]) not in self._checked_sizes:
            self._check_memory(x)  # once per input size, before any spectrum is formed
        plan = self.plan(x.shape[2:], x.device)
        if plan.energy is None:
            assert plan.block is not None
            self.realized_compression = plan.block.compression
            return band_limited_conv(x, self.weight, self.bias, plan, plan.block)
        assert self.preserve_energy is not None and plan.energy is not None
        if self.preserve_energy >= 100:  # the whole spectrum: nothing to measure
            block = plan.block_for_level(plan.energy[2])
            self.realized_compression = block.compression
            return band_limited_conv(x, self.weight, self.bias, plan, block)
        # a forward recomputed in backward (activation checkpointing) must reuse the block of the original
        recomputing = torch._C._current_graph_task_id() != -1
        if plan.pending is not None and not recomputing:
            self.energy_levels.flush()  # the one host sync of this batch, for every layer of the group
        return band_limited_conv(x, self.weight, self.bias, plan, None, choose=self._energy_chooser(plan, recomputing))

    def _energy_chooser(self, plan: SpectrumPlan, recomputing: bool) -> Callable[[Tensor], LowPassBlock]:
        """Measures this batch's level on the device and returns the block to apply (see :class:`EnergyLevels`)."""
        assert plan.energy is not None and self.preserve_energy is not None
        levels, weights, top = plan.energy
        preserve_energy = self.preserve_energy

        def choose(spectrum: Tensor) -> LowPassBlock:
            # zero padding only shifts the signal: the energy per frequency is that of the input
            measured = energy_level(spectrum, levels, weights, top, preserve_energy)
            if plan.level is None:  # first batch at this input size: calibrate now (one sync)
                plan.level = read_levels(measured.view(1))[0]
            elif not recomputing:
                self.energy_levels.submit(plan, measured)
            block = plan.block_for_level(plan.level)
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
