"""``band_limit``: convert a model's convolutions to band-limited FFT convolutions (Dziedzic et al., ICML 2019)."""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_memcomp.bandlimit.functional import (
    DEFAULT_FFT_SIZE,
    BandLimitMemoryError,
    LayerEstimate,
    _check_fft_size,
    _check_on_larger,
    _mib,
    estimate_conv,
    resolve_rates,
)
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

__all__ = [
    "BAND_LIMITED_TYPES",
    "BandLimitEstimate",
    "band_limit",
    "band_limited_layers",
    "default_selection",
    "estimate_band_limit",
]

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


@dataclass
class BandLimitEstimate:
    """What a band-limited conversion would hold for backward and roughly cost, layer by layer.

    One :class:`~lightning_memcomp.bandlimit.functional.LayerEstimate` per call of each convolution in the probe
    forward pass (a convolution called twice holds two spectra). ``str()`` gives a table.
    """

    layers: list[LayerEstimate] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def held_bytes(self) -> int:
        """Spectra held for backward by all band-limited layers."""
        return sum(e.held_bytes for e in self.layers)

    @property
    def conv_bytes(self) -> int:
        """Inputs the replaced convolutions save for backward."""
        return sum(e.conv_bytes for e in self.layers)

    @property
    def added_bytes(self) -> int:
        """Net change of what the model holds for backward (spectra added minus convolution inputs freed)."""
        return sum(e.added_bytes for e in self.layers)

    @property
    def larger(self) -> list[LayerEstimate]:
        """The layers whose spectrum is larger than the input the convolution they replace saves."""
        return [e for e in self.layers if e.larger]

    @property
    def holds_more(self) -> bool:
        """The conversion would make the model hold more for backward: a layer's spectrum is larger than its
        convolution's input, or the spectra added exceed the convolution inputs freed."""
        return bool(self.larger) or self.added_bytes > 0

    def summary(self, limit: int = 6) -> str:
        """The totals and the layers that add the most (at most ``limit`` listed), in MiB."""
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)
        freed = sum(e.freed_bytes for e in self.layers)
        sign = "+" if self.added_bytes >= 0 else "-"
        lines = [
            f"band_limit({opts}) estimate: {len(self.layers)} convolution call(s) would hold "
            f"{_mib(self.held_bytes)} of spectra for backward where the convolutions hold {_mib(self.conv_bytes)} "
            f"({self.held_bytes / max(self.conv_bytes, 1):.2f}x), of which {_mib(freed)} no other layer keeps: "
            f"net {sign}{_mib(abs(self.added_bytes))} held for backward; largest forward transient "
            f"{_mib(max((e.transient_bytes for e in self.layers), default=0))}"
        ]
        adding = sorted((e for e in self.layers if e.larger or e.added_bytes > 0), key=lambda e: -e.added_bytes)
        if adding:
            lines.append(
                f"{len(self.larger)} layer(s) hold a spectrum larger than their convolution's input; "
                f"{sum(e.added_bytes > 0 for e in self.layers)} add to what the model holds "
                f"(+{_mib(sum(max(e.added_bytes, 0) for e in self.layers))}):"
            )
            lines += [f"  {e.describe()}" for e in adding[:limit]]
            if len(adding) > limit:
                lines.append(f"  ... and {len(adding) - limit} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        rows = [f"{'layer':<32} {'input':>18} {'fft':>12} {'held MiB':>9} {'conv MiB':>9} {'ratio':>6} "
                f"{'shared':>6} {'MAC ratio':>9}"]
        for e in self.layers:
            rows.append(
                f"{e.name[:32]:<32} {'x'.join(map(str, e.input_shape)):>18} {'x'.join(map(str, e.fft_shape)):>12} "
                f"{e.held_bytes / 2**20:>9.3f} {e.conv_bytes / 2**20:>9.3f} {e.ratio:>6.2f} "
                f"{'yes' if e.input_shared else 'no':>6} {4 * e.spectral_macs / max(e.direct_macs, 1):>9.2f}"
            )
        return self.summary() + "\n" + "\n".join(rows)


def _call_args(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A LightningModule's ``example_input_array`` convention: a tensor, a tuple of arguments or a dict of kwargs."""
    if isinstance(example_input, Tensor):
        return (example_input,), {}
    if isinstance(example_input, Mapping):
        return (), dict(example_input)
    if isinstance(example_input, (list, tuple)):
        return tuple(example_input), {}
    return (example_input,), {}


class ExampleInputError(RuntimeError):
    """The example input given for the estimate failed in the model's forward pass (the cause is chained)."""


def _conv_base(module: nn.Module) -> type[nn.Module] | None:
    return next((c for c in _LAYER_FOR if isinstance(module, c)), None)


def _eligible(module: nn.Module) -> bool:
    """Whether the factory of :func:`band_limit` would convert ``module`` (a plain Conv1d/2d/3d it supports)."""
    base = _conv_base(module)
    if base is None or isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return False
    if type(module) is not base and (
        type(module).forward is not base.forward or type(module)._conv_forward is not base._conv_forward
    ):
        return False
    return (
        module.groups == 1  # type: ignore[union-attr]
        and all(d == 1 for d in module.dilation)  # type: ignore[union-attr]
        and module.padding_mode == "zeros"  # type: ignore[union-attr]
    )


def _padding_pairs(conv: nn.Module) -> tuple[tuple[int, int], ...]:
    padding = conv.padding  # type: ignore[union-attr]
    kernel = conv.kernel_size  # type: ignore[union-attr]
    if padding == "valid":
        return tuple((0, 0) for _ in kernel)
    if padding == "same":
        return tuple(((k - 1) // 2, (k - 1) - (k - 1) // 2) for k in kernel)
    return tuple((int(p), int(p)) for p in padding)


def _storage(t: Tensor) -> Any:
    try:
        return t.untyped_storage()  # one Python object per storage, weakly referenceable
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
        return None


def _input_shapes(
    model: nn.Module, targets: list[tuple[str, nn.Module]], example_input: Any
) -> list[tuple[str, nn.Module, torch.Size, torch.dtype, bool]]:
    """Each call of the ``targets`` in one probe forward pass: ``(name, module, input shape, dtype, shared)``.

    The probe runs with autograd recording (eval mode, so no statistics change) under saved-tensor hooks that
    count, per storage, how many operations outside the targets save it for backward and keep nothing (nothing
    is held, and no backward runs): ``shared`` says that such an operation saves the convolution's input, so
    band-limiting frees none of it (or that an earlier converted convolution read the same input: it is freed
    once).
    """
    calls: list[tuple[str, nn.Module, Tensor]] = []
    # storages saved by operations outside the targets; weak, so a freed storage's address reused by a later
    # tensor is not mistaken for it
    saved: weakref.WeakSet[Any] = weakref.WeakSet()
    inside = [0]
    handles = []
    for name, module in targets:
        def hook(mod: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
            inside[0] += 1
            x = args[0] if args else None
            if isinstance(x, Tensor):
                calls.append((_name, mod, x))

        def leave(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            inside[0] -= 1

        handles.append(module.register_forward_pre_hook(hook))
        handles.append(module.register_forward_hook(leave))

    def pack(t: Tensor) -> None:
        if inside[0]:
            return  # a target's own save: gone once it is band-limited
        key = _storage(t)
        if key is not None:
            saved.add(key)

    def unpack(_: None) -> Tensor:  # pragma: no cover - the probe never runs backward
        raise RuntimeError("band_limit's probe forward pass keeps no tensors for backward")

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            _probe(model, example_input, grad=True)
    except Exception as err:
        raise ExampleInputError(
            f"band_limit: example_input of type {type(example_input).__name__} does not run through the model "
            f"({type(err).__name__}: {err})"
        ) from err
    finally:
        for h in handles:
            h.remove()
    out, counted = [], set()
    for name, mod, x in calls:  # the inputs are alive (held in calls), so their storages' ids are stable
        key = _storage(x)
        # kept by an operation that stays, or already counted as freed at an earlier converted reader
        out.append((name, mod, x.shape, x.dtype, key is not None and (key in saved or id(key) in counted)))
        counted.add(id(key))
    calls.clear()
    return out


def estimate_band_limit(
    model: nn.Module,
    example_input: Any,
    compress_rate: float | None = None,
    preserve_energy: float | None = None,
    modules: ModuleSelection = None,
    *,
    fft_size: str = DEFAULT_FFT_SIZE,
) -> BandLimitEstimate:
    """What :func:`band_limit` with these options would hold for backward, without converting anything.

    Runs ``model`` once on ``example_input`` (eval mode, no grad, modes restored; a tensor, a tuple of
    positional arguments or a dict of keyword arguments) to see each selected convolution's input shape, and
    returns a :class:`BandLimitEstimate`: per call, the FFT grid, the spectrum held for backward against the
    input the convolution saves, the largest forward transient and the multiply-accumulate counts. In
    ``preserve_energy`` mode the held figures are upper bounds (the whole spectrum).
    """
    rate, energy = resolve_rates(compress_rate, preserve_energy)
    _check_fft_size(fft_size)
    select = module_filter(modules, default_selection)
    targets = [(n, m) for n, m in model.named_modules() if n and select(m, n) and _eligible(m)]
    estimate = BandLimitEstimate(options={"compress_rate": rate, "preserve_energy": energy, "fft_size": fft_size})
    for name, conv, shape, dtype, shared in _input_shapes(model, targets, example_input):
        layer = estimate_conv(
            shape, dtype, conv.out_channels, conv.kernel_size, conv.stride,  # type: ignore[arg-type]
            _padding_pairs(conv), rate, fft_size, name,
        )
        estimate.layers.append(dataclasses.replace(layer, input_shared=shared))
    return estimate


def _act_on(estimate: BandLimitEstimate, on_larger: str) -> None:
    if on_larger == "ignore" or not estimate.holds_more:
        return
    message = estimate.summary() + (
        "\nA higher compress_rate"
        + (", fft_size='minimal'" if estimate.options.get("fft_size") != "minimal" else "")
        + " or leaving those layers plain convolutions (modules=) avoids it; on_larger='ignore' silences this check."
    )
    if on_larger == "error":
        raise BandLimitMemoryError(message + " Nothing was converted (on_larger='error').")
    warnings.warn(message, stacklevel=3)


def _refuse_reconversion(
    model: nn.Module, select: Any, rate: float | None, energy: float | None, fft_size: str
) -> None:
    """Band-limited layers this call selects but with other options: converting would silently keep the old ones."""
    clashes = []
    for name, layer in model.named_modules():
        if not isinstance(layer, BAND_LIMITED_TYPES):
            continue
        mine = (layer.compress_rate, layer.preserve_energy, layer.fft_size)
        if mine == (rate, energy, fft_size):
            continue
        stand_in = layer._conv_type(  # a meta-device original, so every kind of selection can judge it
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
            padding=layer.padding, bias=layer.bias is not None, device="meta",
        )
        if select(stand_in, name):
            clashes.append(f"{name} (compress_rate={mine[0]}, preserve_energy={mine[1]}, fft_size={mine[2]!r})")
    if clashes:
        listing = ", ".join(clashes[:4]) + (f" and {len(clashes) - 4} more" if len(clashes) > 4 else "")
        raise ValueError(
            f"band_limit(compress_rate={rate}, preserve_energy={energy}, fft_size={fft_size!r}): the model is already "
            f"band-limited with other options: {listing}. Band-limiting again would keep the first options; convert "
            "a fresh (unconverted) copy of the model with the new options, or select other layers with modules="
        )


def band_limit(
    model: nn.Module,
    compress_rate: float | None = None,
    preserve_energy: float | None = None,
    modules: ModuleSelection = None,
    *,
    fft_size: str = DEFAULT_FFT_SIZE,
    example_input: Tensor | Sequence[Any] | Mapping[str, Any] | None = None,
    on_larger: str = "warn",
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
        fft_size: ``"minimal"`` (default: per layer and dim the padded input size, the smallest grid that is
            exact), ``"fast"`` (that rounded up to a 2-3-5-7-smooth size), ``"linear"`` or ``"power2"`` (the
            paper's grids, about twice as large per dim); see ``FFT_SIZES``.
        example_input: an input of the model (a tensor, a tuple of positional arguments or a dict of keyword
            arguments). When given, the model is run once on it before converting (``eval`` mode, no grad,
            modes restored) to estimate what each layer will hold (:func:`estimate_band_limit`, also in
            ``report.extra["estimate"]``), and the report holds each layer's realized compression. Without it
            each layer checks its own estimate at its first forward pass at a new input size.
        on_larger: where a band-limited layer would hold more for backward than the convolution it replaces:
            ``"warn"`` (default; with an example input one warning before converting, with the per-layer and
            total estimates in MiB), ``"error"`` (raise :class:`BandLimitMemoryError` with the estimate; with an
            example input nothing is converted) or ``"ignore"``.

    Returns:
        A :class:`~lightning_memcomp.ConversionReport`; each converted entry's details hold the requested
        ``compress_rate`` or ``preserve_energy`` and the ``realized_compression`` (``None`` until the layer
        has seen an input: pass ``example_input``, or read ``layer.realized_compression`` after a step).

    Raises:
        ValueError: invalid options, or layers this call selects are already band-limited with other options
            (band-limiting twice would silently keep the first ones).
        BandLimitMemoryError: ``on_larger="error"`` and a layer would hold more than its convolution.

    The conversion is recorded on the model (:func:`lightning_memcomp.checkpoint.record_conversion`) so a
    checkpoint can rebuild it. Idempotent: calling it again with the same options leaves band-limited layers
    alone.

    Example::

        report = band_limit(model, compress_rate=50, example_input=torch.randn(1, 3, 32, 32))
        print(report.extra["estimate"])
    """
    rate, energy = resolve_rates(compress_rate, preserve_energy)
    _check_fft_size(fft_size)
    _check_on_larger(on_larger)
    select = module_filter(modules, default_selection)
    _refuse_reconversion(model, select, rate, energy, fft_size)
    estimate = None
    if example_input is not None:
        estimate = estimate_band_limit(model, example_input, rate, energy, modules, fft_size=fft_size)
        _act_on(estimate, on_larger)

    def factory(module: nn.Module, name: str) -> nn.Module:
        layer_cls = _LAYER_FOR.get(type(module))
        if layer_cls is None:
            base = _conv_base(module)
            if base is None:
                raise Unsupported(f"{type(module).__name__} is not a Conv1d, Conv2d or Conv3d")
            if type(module).forward is not base.forward or type(module)._conv_forward is not base._conv_forward:
                raise Unsupported(
                    f"{type(module).__name__} subclasses nn.{base.__name__} with its own forward, which a "
                    "band-limited layer would not reproduce"
                )
            layer_cls = _LAYER_FOR[base]
        try:
            layer = layer_cls.from_conv(
                module, compress_rate=rate, preserve_energy=energy, fft_size=fft_size, on_larger=on_larger
            )
        except UnsupportedConvError as err:
            raise Unsupported(str(err)) from None
        layer.qualified_name = name
        return layer

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
    if estimate is not None:
        report.extra["estimate"] = estimate
        by_name = {c.name: c for c in report.converted}
        for e in estimate.layers:
            entry = by_name.get(e.name)
            if entry is None:
                continue
            layer = model.get_submodule(e.name)
            layer._checked_sizes.add(tuple(e.input_shape[2:]))  # type: ignore[union-attr]
            if e.compression is not None:
                layer.realized_compression = e.compression  # type: ignore[union-attr]
                entry.details["realized_compression"] = e.compression
        if energy is not None and report.converted:  # the energy mode's compression needs the data
            _probe(model, example_input)
            for entry in report.converted:
                entry.details["realized_compression"] = model.get_submodule(entry.name).realized_compression
    return report


def _probe(model: nn.Module, example_input: Any, grad: bool = False) -> None:
    """One forward pass in eval mode (batch-norm statistics untouched), without grad unless ``grad``; modes
    restored."""
    modes = {m: m.training for m in model.modules()}
    args, kwargs = _call_args(example_input)
    try:
        model.eval()
        with torch.set_grad_enabled(grad):
            model(*args, **kwargs)
    finally:
        for m, training in modes.items():
            m.training = training
