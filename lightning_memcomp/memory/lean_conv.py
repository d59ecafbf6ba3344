"""Convolutions whose backward decodes its saved input a slice of the batch at a time.

What a compressed activation costs at the step's peak is not only its payload: PyTorch's convolution backward
takes the whole saved input, so the codec decodes it to one full-size tensor, and on CPU oneDNN then reorders
that input and the incoming gradient into its blocked layout (two more full-size copies, plus the one it
writes the input gradient to). Measured on a 64x64x32x32 float32 NCHW input: the backward allocates three
full-size tensors beside the decoded input; on ``channels_last`` tensors only the input gradient.

While a :class:`~lightning_memcomp.memory.engine.SavedTensorEngine` with ``conv_chunk_bytes`` runs, every
``nn.Conv1d/2d/3d`` (and subclasses that keep their ``_conv_forward``) runs through :class:`_LeanConv`:

* forward: the plain convolution; the input is saved for backward through the engine (the same pack the
  preceding activation already made, so nothing is held twice);
* backward: the batch is cut into slices of about ``conv_chunk_bytes`` (input plus gradient); each slice of
  the input is decoded on its own (:meth:`Codec.decode_batch`; a codec that cannot decode part of a payload
  decodes it once, whole), and ``aten.convolution_backward`` runs per slice, writing the input gradient into
  one preallocated tensor and summing the weight and bias gradients.

So the full-size transients at a convolution's backward are the input gradient alone. The weight gradient is
a sum over slices (float32 summation order differs from one call: the gradients agree to rounding, see
``tests/test_lean_conv.py``). A backward that builds a graph (``create_graph=True``) or runs a second time
(``retain_graph=True``) takes the plain path on the whole decoded input, so higher-order gradients stay
exact. Autocast, string padding (``"same"``/``"valid"``), transposed convolutions and modules that override
``_conv_forward`` keep PyTorch's convolution.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DEFAULT_CONV_CHUNK_BYTES", "check_chunk_bytes", "install", "is_lean_candidate", "resolve_chunk_bytes"]

#: bytes of input plus output gradient per backward slice: 4 MiB on CPU (the slices stay in cache-sized
#: pieces; measured no slower than one call), 64 MiB on CUDA (large enough to keep the GPU busy)
DEFAULT_CONV_CHUNK_BYTES = {"cpu": 4 << 20, "cuda": 64 << 20}
#: the fewest samples in a CPU slice (see _sliced_backward)
MIN_CPU_ROWS = 2
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_STOCK = {cls: cls._conv_forward for cls in _CONV_TYPES}


def check_chunk_bytes(value: Any) -> int | None:
    """``value`` if it is a valid ``conv_chunk_bytes`` (an integer >= 0, or ``None``), else a ``ValueError``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"conv_chunk_bytes={value!r} is not allowed; use an integer >= 0 (0: off) or None "
                         "(4 MiB on CPU, 64 MiB on CUDA)")
    return value


def resolve_chunk_bytes(value: int | None, device: torch.device) -> int:
    """The slice budget for ``device``: ``value``, or the default for the device type when ``None``."""
    if value is not None:
        return value
    return DEFAULT_CONV_CHUNK_BYTES.get(device.type, DEFAULT_CONV_CHUNK_BYTES["cuda"])


def is_lean_candidate(module: nn.Module) -> bool:
    """A plain ``nn.Conv1d/2d/3d`` (or a subclass keeping its ``_conv_forward``) with numeric padding."""
    for cls in _CONV_TYPES:
        if isinstance(module, cls):
            return (getattr(type(module), "_conv_forward", None) is _STOCK[cls]
                    and "_conv_forward" not in module.__dict__ and not isinstance(module.padding, str))
    return False


def install(module: nn.Module, packer: Callable[[Tensor, Tensor], Any], chunk_bytes: int | None
            ) -> Callable[[], None]:
    """Route ``module``'s convolution through :class:`_LeanConv`; returns the function that undoes it.

    ``packer(input, weight)`` packs the input as the engine's saved-tensor hook does and returns the pack (an
    object with ``check_version()``, ``decode()`` and ``decode_batch(start, stop)``), or ``None`` where the
    convolution should stay PyTorch's (the input is not one dense region, the weight is not a weight).
    """
    stock = type(module)._conv_forward
    dims = len(module.kernel_size)

    def conv_forward(input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if not _lean_applies(input, weight, bias):
            return stock(module, input, weight, bias)
        padding = module.padding
        if module.padding_mode != "zeros":
            input = F.pad(input, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = (0,) * dims
        packed = packer(input, weight)
        if packed is None:  # PyTorch's convolution (on the padded input: what the stock method would run)
            return _plain(input, weight, bias, module.stride, padding, module.dilation, module.groups)
        budget = resolve_chunk_bytes(chunk_bytes, input.device)
        return _LeanConv.apply(input, weight, bias, tuple(module.stride), tuple(padding), tuple(module.dilation),
                               module.groups, packed, budget)

    module._conv_forward = conv_forward  # an instance attribute: shadows the class's method

    def undo() -> None:
        if module.__dict__.get("_conv_forward") is conv_forward:
            del module._conv_forward

    return undo


def _plain(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any, dilation: Any,
           groups: int) -> Tensor:
    return (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3](x, weight, bias, stride, padding, dilation, groups)


def _lean_applies(input: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if not torch.is_grad_enabled() or not weight.requires_grad:
        return False  # nothing to save (eval, frozen weight: then the input is not needed for backward)
    if input.dim() < 3 or input.shape[0] < 2 or input.is_nested or input.layout != torch.strided:
        return False
    if torch.is_autocast_enabled(input.device.type):
        return False  # autocast casts inside the convolution: PyTorch's own saves the casts
    return input.dtype == weight.dtype and (bias is None or bias.dtype == weight.dtype)


class _LeanConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...],
                padding: tuple[int, ...], dilation: tuple[int, ...], groups: int, packed: Any,
                chunk_bytes: int) -> Tensor:
        out = _plain(x, weight, bias, stride, padding, dilation, groups)
        # the input was packed before (the pack the engine made for the activation that produced it, when there
        # is one) and is saved too: the pack hook finds that same pack, so the payload is held once. The saved
        # copy serves backward passes that build a graph or run twice; the pack, the sliced backward.
        ctx.packed = packed
        ctx.save_for_backward(x)
        ctx.weight = weight
        ctx.weight_version = weight._version
        ctx.conf = (stride, padding, dilation, groups, chunk_bytes, None if bias is None else tuple(bias.shape))
        ctx.x_meta = (tuple(x.shape), tuple(x.stride()))
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        stride, padding, dilation, groups, chunk_bytes, bias_sizes = ctx.conf
        weight = ctx.weight
        if weight._version != ctx.weight_version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"the convolution weight {list(weight.shape)} is at version {weight._version}; expected version "
                f"{ctx.weight_version} instead. Hint: do not update the weights in place between forward and "
                "backward (lightning_memcomp's sliced convolution backward)."
            )
        packed, ctx.packed = ctx.packed, None
        want = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias_sizes is not None and ctx.needs_input_grad[2]]
        extra = (None,) * 6
        if packed is None or torch.is_grad_enabled():
            (x,) = ctx.saved_tensors
            gx, gw, gb = torch.ops.aten.convolution_backward(
                grad_out, x, weight, list(bias_sizes) if bias_sizes else None, list(stride), list(padding),
                list(dilation), False, [0] * len(stride), groups, want)
            return (gx, gw, gb, *extra)
        return (*_sliced_backward(packed, grad_out, weight, ctx.x_meta, ctx.conf, want), *extra)


def _sliced_backward(packed: Any, grad_out: Tensor, weight: Tensor, x_meta: tuple, conf: tuple,
                     want: list[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    stride, padding, dilation, groups, chunk_bytes, bias_sizes = conf
    shape, strides = x_meta
    packed.check_version()
    n = shape[0]
    per_sample = (grad_out[0].numel() + (torch.Size(shape[1:]).numel())) * grad_out.element_size()
    rows = max(1, min(n, chunk_bytes // max(per_sample, 1)))
    if grad_out.device.type == "cpu":
        # PyTorch runs a one-sample 3x3 convolution of a small map on its slow native kernel instead of
        # oneDNN (10x slower measured on a 3-D UNet): CPU slices hold two samples at least
        rows = max(rows, MIN_CPU_ROWS)
    if rows >= n:  # one slice: the plain call on the whole decoded input
        return torch.ops.aten.convolution_backward(
            grad_out, packed.decode(), weight, list(bias_sizes) if bias_sizes else None, list(stride),
            list(padding), list(dilation), False, [0] * len(stride), groups, want)
    gx = torch.empty_strided(shape, strides, dtype=grad_out.dtype, device=grad_out.device) if want[0] else None
    gw = torch.zeros_like(weight) if want[1] else None
    gb = grad_out.new_zeros(bias_sizes) if want[2] else None
    whole = None
    count = n // rows  # balanced slices of rows to 2 * rows - 1 samples: none smaller than the CPU minimum
    bounds = [n * i // count for i in range(count + 1)]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if whole is None:
            part = packed.decode_batch(start, stop)
            if part is None:  # the codec decodes this payload only whole: once, then sliced
                whole = packed.decode()
        x = whole[start:stop] if whole is not None else part
        g = grad_out[start:stop]
        gi, gwi, gbi = torch.ops.aten.convolution_backward(
            g, x, weight, list(bias_sizes) if bias_sizes else None, list(stride), list(padding), list(dilation),
            False, [0] * len(stride), groups, want)
        if gx is not None:
            gx[start:stop].copy_(gi)
        if gw is not None:
            gw.add_(gwi)
        if gb is not None:
            gb.add_(gbi)
        del x, g, gi, gwi, gbi
        part = None
    return gx, gw, gb
