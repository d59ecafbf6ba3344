"""Convolutions whose filters are generated from codes by the shared slice generator (Omidvar et al., 2021).

A converted convolution owns codes ``[ceil(out/s0) * ceil(in/s1), code_size]`` (``in`` per group),
one code per slice. Each forward pass generates every slice with the network's one
:class:`~lightning_memcomp.csg.generator.SliceGenerator` (eq. 1), lays the slices out as a weight of
``ceil(out/s0)*s0`` by ``ceil(in/s1)*s1`` by kernel (slice ``i = o * ceil(in/s1) + j`` fills output
block ``o``, input block ``j``), crops it to ``[out, in]`` (the paper's "fractional partitions") and
convolves exactly as the original layer did (stride, padding, padding mode, dilation, groups, bias).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _ntuple, _reverse_repeat_tuple

from lightning_memcomp.csg.generator import SliceGenerator
from lightning_memcomp.memory.engine import keep_exact

__all__ = [
    "INITS",
    "SliceConv",
    "SliceConv1d",
    "SliceConv2d",
    "SliceConv3d",
    "slices_to_weight",
    "unsupported_reason",
    "weight_to_slices",
]

#: Allowed values of ``init``: Kaiming-variance codes from scratch, or least-squares fit to the original weights.
INITS = ("kaiming", "fit")

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_FUNCTIONAL = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

IntOrTuple = int | Sequence[int]


def _blocks(out_channels: int, in_per_group: int, slice_shape: Sequence[int]) -> tuple[int, int]:
    return math.ceil(out_channels / slice_shape[0]), math.ceil(in_per_group / slice_shape[1])


def slices_to_weight(slices: Tensor, slice_shape: Sequence[int], out_channels: int, in_per_group: int) -> Tensor:
    """Lay out flat slices ``[n_out * n_in, prod(slice_shape)]`` as a conv weight, cropped to ``[out, in]``."""
    s0, s1, *kernel = slice_shape
    n_out, n_in = _blocks(out_channels, in_per_group, slice_shape)
    w = slices.reshape(n_out, n_in, s0, s1, *kernel).transpose(1, 2)  # [n_out, s0, n_in, s1, *kernel]
    w = w.reshape(n_out * s0, n_in * s1, *kernel)
    return w[:out_channels, :in_per_group]


def weight_to_slices(weight: Tensor, slice_shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`slices_to_weight`: flat slices of ``weight`` (zero-padded) and a mask of real entries."""
    s0, s1, *kernel = slice_shape
    out_channels, in_per_group = weight.shape[:2]
    n_out, n_in = _blocks(out_channels, in_per_group, slice_shape)
    padded = weight.new_zeros(n_out * s0, n_in * s1, *kernel)
    mask = torch.zeros(padded.shape, dtype=torch.bool, device=weight.device)
    padded[:out_channels, :in_per_group] = weight
    mask[:out_channels, :in_per_group] = True

    def flat(t: Tensor) -> Tensor:
        t = t.reshape(n_out, s0, n_in, s1, *kernel).transpose(1, 2)
        return t.reshape(n_out * n_in, -1)

    return flat(padded), flat(mask)


def unsupported_reason(conv: nn.Module, slice_shape: Sequence[int]) -> str | None:
    """Why ``conv`` cannot be generated from slices of ``slice_shape`` (``None`` when it can)."""
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return "transposed convolutions are not supported"
    if isinstance(conv, nn.modules.lazy.LazyModuleMixin) and conv.has_uninitialized_params():
        return "lazy convolution with uninitialized weights (run a forward pass first)"
    if not isinstance(conv, tuple(_CONVS.values())):
        return f"{type(conv).__name__} is not a Conv1d, Conv2d or Conv3d"
    kernel = tuple(conv.kernel_size)
    if tuple(slice_shape[2:]) != kernel:
        return (
            f"kernel {kernel} does not match the slice's trailing dimensions {tuple(slice_shape[2:])} "
            f"(slice_shape={tuple(slice_shape)})"
        )
    return None


class SliceConv(nn.Module):
    """A 1-, 2- or 3-D convolution whose weight is generated from codes by a shared :class:`SliceGenerator`.

    Omidvar et al., "Associative Convolutional Layers", AISTATS 2021 (Sec. 2.1.1 slices, eq. 1). Use
    :class:`SliceConv1d`, :class:`SliceConv2d` or :class:`SliceConv3d`, or :meth:`from_conv`.

    The generator is referenced, not registered as a child: it is registered once, on the model root
    (by :func:`~lightning_memcomp.csg.slice_generate`), so it appears once in ``model.parameters()``
    and ``state_dict()``, and is moved, saved and wrapped (DDP) with the model. A layer used on its own
    must therefore be moved together with its generator.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode:
            as for ``nn.ConvNd``; ``kernel_size`` must equal ``generator.slice_shape[2:]``.
        generator: the network's slice generator.
        init: ``"kaiming"``: codes drawn so that the generated filters have the variance of
            ``nn.init.kaiming_normal_`` (fan-in, ReLU gain: ``2 / fan_in``), whatever the generator.
    """

    _dims: int = 0
    #: relative weight error left by ``init="fit"`` (``None`` for a scratch initialization)
    fit_error: float | None = None
    codes: nn.Parameter
    bias: nn.Parameter | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        generator: SliceGenerator,
        stride: IntOrTuple = 1,
        padding: IntOrTuple | str = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        init: str = "kaiming",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if self._dims not in _CONVS:
            raise TypeError("use SliceConv1d, SliceConv2d or SliceConv3d (or SliceConv.from_conv)")
        ntuple = _ntuple(self._dims)
        if groups <= 0 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must be positive and divide in_channels={in_channels} and out_channels={out_channels}"
            )
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode={padding_mode!r} is not allowed; use one of {', '.join(_PADDING_MODES)}")
        if init not in ("kaiming",):
            raise ValueError(
                f"init={init!r} is not allowed here; use 'kaiming' (init='fit' needs the original weights: "
                "use SliceConv.from_conv)"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = ntuple(kernel_size)
        self.stride = ntuple(stride)
        self.dilation = ntuple(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding={padding!r} is not allowed; use 'same', 'valid' or integers")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding: tuple[int, ...] | str = padding
            if padding == "same":
                pads: list[int] = []
                for d, k in zip(reversed(self.dilation), reversed(self.kernel_size), strict=True):
                    total = d * (k - 1)
                    pads += [total // 2, total - total // 2]
                self._reversed_padding_repeated_twice = pads
            else:
                self._reversed_padding_repeated_twice = [0, 0] * self._dims
        else:
            self.padding = ntuple(padding)
            self._reversed_padding_repeated_twice = list(_reverse_repeat_tuple(self.padding, 2))
        self.use_generator(generator)
        n_out, n_in = _blocks(out_channels, self.in_channels // groups, generator.slice_shape)
        factory = {"device": device if device is not None else generator.weight.device,
                   "dtype": dtype if dtype is not None else generator.weight.dtype}
        self.codes = nn.Parameter(torch.empty(n_out * n_in, generator.code_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # -- the generator -----------------------------------------------------------------------------

    @property
    def generator(self) -> SliceGenerator:
        """The shared slice generator (referenced, not a child module)."""
        return self._generator

    def use_generator(self, generator: SliceGenerator) -> None:
        """Point this layer at ``generator`` (same ``code_size`` and kernel; not registered as a child)."""
        if not isinstance(generator, SliceGenerator):
            raise TypeError(f"generator={type(generator).__name__} is not a SliceGenerator")
        shape = generator.slice_shape
        if len(shape) != self._dims + 2 or tuple(shape[2:]) != self.kernel_size:
            raise ValueError(
                f"slice_shape={shape} does not fit a {self._dims}-D convolution with kernel {self.kernel_size}; "
                "the slice's trailing dimensions must equal the kernel"
            )
        current = self.__dict__.get("_generator")
        if current is not None and (current.code_size != generator.code_size or current.slice_shape != shape):
            raise ValueError(
                f"generator with slice_shape={shape}, code_size={generator.code_size} does not fit codes made for "
                f"slice_shape={current.slice_shape}, code_size={current.code_size}"
            )
        # object.__setattr__ keeps it out of _modules: one module path to the generator (the root's),
        # so parameters(), state_dict() and DDP see it exactly once; deepcopy and pickle keep the
        # sharing because they copy the whole model with one memo
        object.__setattr__(self, "_generator", generator)

    @property
    def slice_shape(self) -> tuple[int, ...]:
        return self._generator.slice_shape

    @property
    def code_size(self) -> int:
        return self._generator.code_size

    @property
    def fan_in(self) -> int:
        return self.in_channels // self.groups * math.prod(self.kernel_size)

    # -- initialization ------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Kaiming-variance filters from scratch (not the original code's mean-1/1000 codes); bias as nn.ConvNd."""
        target_std = math.sqrt(2.0 / self.fan_in)  # nn.init.kaiming_normal_ default (fan_in, ReLU)
        gain = self._generator.mean_square_gain()
        if gain <= 0:
            raise ValueError("the slice generator's weights are all zero; cannot initialize codes")
        nn.init.normal_(self.codes, std=target_std / math.sqrt(gain))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def fit_(self, weight: Tensor) -> float:
        """Least-squares codes that make the generated weight closest to ``weight``; returns the relative error.

        Beyond the paper: lets a converted pretrained network start close to its original filters.
        """
        expected = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not match this layer's {expected}")
        slices, mask = weight_to_slices(weight.detach().to(self.codes.device), self.slice_shape)
        self.codes.copy_(self._generator.fit_codes(slices, mask).to(self.codes))
        return float(relative_error(self.generate_weight(), weight))

    # -- forward -------------------------------------------------------------------------------------

    def generate_weight(self) -> Tensor:
        """The current filters ``[out, in/groups, *kernel]``, generated from the codes (eq. 1) and cropped."""
        slices = self._generator(self.codes)
        return slices_to_weight(slices, self.slice_shape, self.out_channels, self.in_channels // self.groups)

    def forward(self, x: Tensor) -> Tensor:
        weight = keep_exact(self.generate_weight())  # a weight, never an activation to compress
        conv = _FUNCTIONAL[self._dims]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    # -- conversion ----------------------------------------------------------------------------------

    @classmethod
    def from_conv(cls, conv: nn.Module, generator: SliceGenerator, init: str = "kaiming") -> SliceConv:
        """The slice-generated counterpart of ``conv`` (``nn.Conv1d/2d/3d``), on its device and dtype.

        Every option of ``conv`` is kept and its bias parameter is reused. ``init="kaiming"`` draws the
        codes from scratch; ``init="fit"`` fits them to ``conv.weight`` by least squares through the
        generator (the error is kept as ``layer.fit_error``).

        Raises:
            ValueError: the kernel does not match ``generator.slice_shape``, or ``init`` is unknown.
        """
        if init not in INITS:
            raise ValueError(f"init={init!r} is not allowed; use one of {', '.join(map(repr, INITS))}")
        reason = unsupported_reason(conv, generator.slice_shape)
        if reason is not None:
            raise ValueError(f"cannot generate {type(conv).__name__}: {reason}")
        if generator.weight.device != conv.weight.device:
            raise ValueError(
                f"{type(conv).__name__} is on {conv.weight.device} but the generator is on {generator.weight.device}"
            )
        target = _SLICE_CONVS[conv.weight.dim() - 2]
        new = target(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            generator,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=False,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        if conv.bias is not None:
            new.bias = conv.bias  # the original parameter, shared (not copied)
        new.fit_error = new.fit_(conv.weight) if init == "fit" else None
        return new

    @torch.no_grad()
    def to_conv(self) -> nn.Module:
        """An ordinary ``nn.ConvNd`` holding the generated filters (export; identical outputs)."""
        weight = self.generate_weight()
        conv = _CONVS[self._dims](
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
        )
        conv.weight.copy_(weight)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * self._dims:
            s += f", padding={self.padding}"
        if self.dilation != (1,) * self._dims:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + f", slices={self.codes.shape[0]}, slice_shape={self.slice_shape}, code_size={self.code_size}"


class SliceConv1d(SliceConv):
    """Slice-generated ``nn.Conv1d``; slice shape ``(s0, s1, k)``."""

    _dims = 1


class SliceConv2d(SliceConv):
    """Slice-generated ``nn.Conv2d``; slice shape ``(s0, s1, kh, kw)``, e.g. the paper's ``(16, 16, 3, 3)``."""

    _dims = 2


class SliceConv3d(SliceConv):
    """Slice-generated ``nn.Conv3d``; slice shape ``(s0, s1, kd, kh, kw)``."""

    _dims = 3


_SLICE_CONVS: dict[int, type[SliceConv]] = {1: SliceConv1d, 2: SliceConv2d, 3: SliceConv3d}


def relative_error(approx: Tensor, target: Tensor) -> Tensor:
    """``||approx - target|| / ||target||`` (0 for a zero target matched exactly)."""
    approx, target = approx.detach().double(), target.detach().double().to(approx.device)
    norm = target.norm()
    diff = (approx - target).norm()
    return diff / norm if norm > 0 else diff
