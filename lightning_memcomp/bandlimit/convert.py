"""``band_limit``: convert a model's convolutions to band-limited FFT convolutions (Dziedzic et al., ICML 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_memcomp.bandlimit.functional import _check_fft_size, resolve_rates
from lightning_memcomp.bandlimit.layers import (
    BandLimitedConv1d,
    BandLimitedConv2d,
    BandLimitedConv3d,
    UnsupportedConvError,
    _BandLimitedConvNd,
    share_energy_levels,
)
from lightning_memcomp.checkpoint import record_conversion
from lightning_memcomp.surgery import ConversionReport, ModuleSelection, Unsupported, module_filter, replace_modules

__all__ = ["BAND_LIMITED_TYPES", "band_limit", "band_limited_layers", "default_selection"]

TECHNIQUE = "band_limit"
_LAYER_FOR: dict[type[nn.Module], type[_BandLimitedConvNd]] = {
    nn.Conv1d: BandLimitedConv1d,
    nn.Conv2d: BandLimitedConv2d,
    nn.Conv3d: BandLimitedConv3d,
}
BAND_LIMITED_TYPES: tuple[type[nn.Module], ...] = (BandLimitedConv1d, BandLimitedConv2d, BandLimitedConv3d)


def default_selection(module: nn.Module, name: str) -> bool:
    """The paper's choice: every convolution whose kernel is larger than 1 in every spatial dim (stem included).

    1x1 convolutions (ResNet shortcuts, channel mixers) gain nothing from a spectral representation.
    """
    return isinstance(module, tuple(_LAYER_FOR)) and all(k > 1 for k in module.kernel_size)  # type: ignore[union-attr]


def band_limited_layers(model: nn.Module) -> list[tuple[str, _BandLimitedConvNd]]:
    """The ``(qualified_name, layer)`` pairs of the band-limited layers in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BAND_LIMITED_TYPES)]


def band_limit(
    model: nn.Module,
    compress_rate: float | None = None,
    preserve_energy: float | None = None,
    modules: ModuleSelection = None,
    *,
    fft_size: str = "power2",
    example_input: Tensor | Sequence[Any] | None = None,
) -> ConversionReport:
    """Replace convolutions of ``model`` in place by band-limited FFT convolutions; returns the report.

    Args:
        model: the network (any ``nn.Module``); converted layers keep its weight and bias tensors.
        compress_rate: percent of each layer's one-sided spectrum discarded, in ``[0, 100)``. Default 50
            (the paper's CIFAR setting) when ``preserve_energy`` is not given.
        preserve_energy: instead, percent of the input spectrum's energy kept, in ``(0, 100]``, chosen
            per batch and per layer.
        modules: which modules to convert (see :mod:`lightning_memcomp.surgery`). Default: every
            ``Conv1d/2d/3d`` with a kernel larger than 1 in every spatial dim, the stem included; 1x1
            convolutions are left alone. Convolutions with groups, dilation or non-zero padding modes are
            skipped with a warning and listed in the report.
        fft_size: ``"power2"`` (paper), ``"linear"`` or ``"minimal"`` (see ``FFT_SIZES``).
        example_input: optional input (a tensor or a tuple of positional arguments); when given, the model
            is run once on it (``eval`` mode, no grad, modes restored) so that the report holds each layer's
            realized compression, which depends on the layer's input size.

    Returns:
        A :class:`~lightning_memcomp.ConversionReport`; each converted entry's details hold the requested
        ``compress_rate`` or ``preserve_energy`` and the ``realized_compression`` (``None`` until the layer
        has seen an input: pass ``example_input``, or read ``layer.realized_compression`` after a step).

    The conversion is recorded on the model (:func:`lightning_memcomp.checkpoint.record_conversion`) so a
    checkpoint can rebuild it. Idempotent: already band-limited layers are left alone.

    Example::

        report = band_limit(model, compress_rate=50, example_input=torch.randn(1, 3, 32, 32))
        print(report)
    """
    rate, energy = resolve_rates(compress_rate, preserve_energy)
    _check_fft_size(fft_size)
    select = module_filter(modules, default_selection)

    def factory(module: nn.Module, name: str) -> nn.Module:
        layer_cls = _LAYER_FOR.get(type(module))
        if layer_cls is None:
            base = next((c for c in _LAYER_FOR if isinstance(module, c)), None)
            if base is None:
                raise Unsupported(f"{type(module).__name__} is not a Conv1d, Conv2d or Conv3d")
            if type(module).forward is not base.forward or type(module)._conv_forward is not base._conv_forward:
                raise Unsupported(
                    f"{type(module).__name__} subclasses nn.{base.__name__} with its own forward, which a "
                    "band-limited layer would not reproduce"
                )
            layer_cls = _LAYER_FOR[base]
        try:
            return layer_cls.from_conv(module, compress_rate=rate, preserve_energy=energy, fft_size=fft_size)
        except UnsupportedConvError as err:
            raise Unsupported(str(err)) from None

    def details(layer: nn.Module) -> dict[str, Any]:
        assert isinstance(layer, _BandLimitedConvNd)
        mode = {"compress_rate": rate} if rate is not None else {"preserve_energy": energy}
        return {**mode, "realized_compression": layer.realized_compression}

    report = replace_modules(model, TECHNIQUE, select, factory, converted_types=BAND_LIMITED_TYPES, details=details)
    if energy is not None:
        share_energy_levels(model)  # every layer's level read with one host sync per batch
    report.extra["options"] = {"compress_rate": rate, "preserve_energy": energy, "fft_size": fft_size}
    if report.converted:
        record_conversion(
            model,
            TECHNIQUE,
            {
                "compress_rate": rate,
                "preserve_energy": energy,
                "fft_size": fft_size,
                "modules": [c.name for c in report.converted],
            },
        )
    if example_input is not None:
        _probe(model, example_input)
        for entry in report.converted:
            layer = model.get_submodule(entry.name)
            entry.details["realized_compression"] = layer.realized_compression  # type: ignore[union-attr]
    return report


def _probe(model: nn.Module, example_input: Tensor | Sequence[Any]) -> None:
    """One forward pass in eval mode without grad (batch-norm statistics untouched), modes restored."""
    modes = {m: m.training for m in model.modules()}
    args = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        for m, training in modes.items():
            m.training = training
