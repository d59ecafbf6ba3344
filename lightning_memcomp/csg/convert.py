"""Convert a network's convolutions to slice-generated ones (CSG/BCSG), and fold them back (export).

Omidvar et al., "Associative Convolutional Layers", AISTATS 2021: one shared generator, one code per
filter slice; by default every 3x3 convolution except the first is converted (1x1 convolutions and
the first convolution stay ordinary, as in the paper).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_memcomp.checkpoint import forget_conversion, record_conversion
from lightning_memcomp.csg.generator import GENERATOR_NAME, GeneratorSource, SliceGenerator, check_slice_options
from lightning_memcomp.csg.layers import INITS, SliceConv, unsupported_reason, weight_to_slices
from lightning_memcomp.surgery import (
    ConversionReport,
    ModuleSelection,
    Unsupported,
    count_parameters,
    module_filter,
    replace_modules,
)

__all__ = [
    "DEFAULT_CODE_SIZE",
    "DEFAULT_SLICE_SHAPE",
    "DEFAULT_SLICE_SHAPES",
    "default_slice_shape",
    "fold_slices",
    "slice_generate",
]

#: The paper's slice shape and code size for CIFAR ResNet-56 (Table 1, "CSG-[16,16,3,3]-128").
DEFAULT_SLICE_SHAPE = (16, 16, 3, 3)
DEFAULT_CODE_SIZE = 128
#: The default slice per convolution dimensionality: 16 x 16 channels by a kernel of 3 in every dim (the
#: paper's 2-D slice, extended to 1-D and 3-D). ``slice_generate`` picks it from the model's convolutions.
DEFAULT_SLICE_SHAPES: dict[int, tuple[int, ...]] = {1: (16, 16, 3), 2: DEFAULT_SLICE_SHAPE, 3: (16, 16, 3, 3, 3)}

_TECHNIQUE = "slice_generate"
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FIRST = "the first convolution stays ordinary (paper default; select it with modules= to convert it)"
_POINTWISE = "1x1 convolutions stay ordinary unless the slice is 1x1 (paper default; select them with modules=)"
_BINARY_FIT = (
    "init='fit' is not allowed with a binary generator: BCSG's weights are fixed random signs that cannot be "
    "fitted, so least-squares codes keep only the part of each pretrained slice that falls in a random "
    "code_size-dimensional subspace (relative error about sqrt(1 - code_size / prod(slice_shape))), which "
    "discards most of the pretrained filters; use init='kaiming' (train from scratch, as the paper does for "
    "BCSG) or a trainable generator, which init='fit' fits to the filters"
)


def _is_conv_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.conv._ConvNd, SliceConv))


def _kernel(module: nn.Module) -> tuple[int, ...]:
    return tuple(module.kernel_size)


def default_slice_shape(model: nn.Module, modules: ModuleSelection = None) -> tuple[int, ...]:
    """The default slice for ``model``: :data:`DEFAULT_SLICE_SHAPES` of the dimensionality (1-D, 2-D or 3-D) of
    most of its selected convolutions with a kernel larger than 1 (2-D when there are none)."""
    chosen = module_filter(modules)
    counts: Counter[int] = Counter()
    for name, m in model.named_modules():
        if isinstance(m, _CONV_TYPES) and chosen(m, name) and any(k > 1 for k in m.kernel_size):
            counts[len(m.kernel_size)] += 1
    dims = counts.most_common(1)[0][0] if counts else 2
    return DEFAULT_SLICE_SHAPES[dims]


def _resolve_generator(
    model: nn.Module,
    slice_shape: Sequence[int] | None,
    code_size: int | None,
    binary: bool,
    generator: GeneratorSource | None,
    train_generator: bool | None,
) -> tuple[SliceGenerator, bool]:
    """The generator to use and whether it is new (to be registered on ``model``)."""
    if slice_shape is not None or code_size is not None:
        check_slice_options(
            slice_shape if slice_shape is not None else DEFAULT_SLICE_SHAPE,
            code_size if code_size is not None else DEFAULT_CODE_SIZE,
        )
    existing = model._modules.get(GENERATOR_NAME)
    if existing is not None and not isinstance(existing, SliceGenerator):
        raise TypeError(f"model.{GENERATOR_NAME} is a {type(existing).__name__}, not a SliceGenerator")
    if generator is not None:
        if existing is not None and generator is not existing:
            raise ValueError(
                f"the model already has a slice generator ({GENERATOR_NAME}: {existing.extra_repr()}); the paper uses "
                "one generator per network: convert more layers with generator=None to reuse it"
            )
        gen = existing if existing is not None else SliceGenerator.from_pretrained(generator, bool(train_generator))
        new = existing is None
    elif existing is not None:
        gen, new = existing, False
    else:
        shape, size = check_slice_options(
            slice_shape if slice_shape is not None else DEFAULT_SLICE_SHAPE,
            code_size if code_size is not None else DEFAULT_CODE_SIZE,
        )
        trainable = (not binary) if train_generator is None else bool(train_generator)
        if binary and trainable:
            raise ValueError("train_generator=True is not allowed with binary=True: BCSG is fixed and never trained")
        return SliceGenerator(shape, size, binary=binary, trainable=trainable), True
    # the generator comes from elsewhere or is already on the model: options given must agree with it
    if slice_shape is not None and tuple(slice_shape) != gen.slice_shape:
        raise ValueError(f"slice_shape={tuple(slice_shape)} disagrees with the generator's {gen.slice_shape}")
    if code_size is not None and code_size != gen.code_size:
        raise ValueError(f"code_size={code_size} disagrees with the generator's {gen.code_size}")
    if bool(binary) != gen.binary:
        raise ValueError(f"binary={binary} disagrees with the generator (binary={gen.binary})")
    if train_generator is not None and not new and bool(train_generator) != gen.trainable:
        raise ValueError(
            f"train_generator={train_generator} disagrees with the model's generator (trainable={gen.trainable})"
        )
    return gen, new


def slice_generate(
    model: nn.Module,
    slice_shape: Sequence[int] | None = None,
    code_size: int | None = None,
    binary: bool = False,
    generator: GeneratorSource | None = None,
    modules: ModuleSelection = None,
    init: str = "kaiming",
    train_generator: bool | None = None,
) -> ConversionReport:
    """Replace convolutions of ``model``, in place, by slice-generated ones sharing one generator (CSG/BCSG).

    Omidvar et al., AISTATS 2021: filters are concatenations of slices ``Reshape(A c_i)`` (eq. 1),
    ``A`` shared by the whole network, one code ``c_i`` per slice.

    Args:
        model: the network; the generator is registered on it as ``model.memcomp_slice_generator``
            (once in ``parameters()`` and ``state_dict()``).
        slice_shape: ``(out, in, *kernel)`` of a slice; default: the given or existing generator's, else
            ``(16, 16, 3)``, ``(16, 16, 3, 3)`` (the paper's) or ``(16, 16, 3, 3, 3)`` for a network of mostly
            1-D, 2-D or 3-D convolutions (:func:`default_slice_shape`). Convolutions whose kernel differs from
            ``slice_shape[2:]`` are skipped.
        code_size: code length ``n_c``; default 128, or the given generator's.
        binary: BCSG: a fixed random ``sign(w) * scale`` generator, never trained.
        generator: take the generator from elsewhere (the paper's "pre-trained CSG"): a
            :class:`SliceGenerator`, a converted model, a state dict or checkpoint dict, or a checkpoint
            path. It is copied and frozen unless ``train_generator=True``.
        modules: which convolutions (see :mod:`lightning_memcomp.surgery`); default: every convolution
            except the first one and 1x1 ones (unless the slice is 1x1). A selection names
            convolutions only; other modules it matches are ignored.
        init: ``"kaiming"`` (codes such that the generated filters start with Kaiming variance,
            ``2 / fan_in``), or ``"fit"`` (beyond the paper: a new trainable generator is set to the
            principal directions of the layers' slices, then each layer's codes are the least-squares
            fit of its weights, so a pretrained network starts close to itself; the report gives the
            relative weight error).
        train_generator: train the generator with the codes; default: yes for a new non-binary
            generator, no for a binary or given one.

    Returns:
        A :class:`~lightning_memcomp.surgery.ConversionReport`; ``extra`` holds ``slice_shape``,
        ``code_size``, ``binary``, ``train_generator``, ``generator_parameters``, ``code_parameters``
        and, for ``init="fit"``, ``fit_relative_error``.

    Raises:
        ValueError: non-positive or malformed sizes, unknown ``init``, ``binary=True`` with
            ``init="fit"``, or options that disagree with a generator the model already has.

    Example:
        >>> report = slice_generate(resnet56, slice_shape=(16, 16, 3, 3), code_size=128)  # doctest: +SKIP
        >>> report.param_ratio  # doctest: +SKIP
        2.457...
    """
    if init not in INITS:
        raise ValueError(f"init={init!r} is not allowed; use one of {', '.join(map(repr, INITS))}")
    if not isinstance(binary, bool):
        raise TypeError(f"binary={binary!r} must be True or False")
    if binary and init == "fit":
        raise ValueError(_BINARY_FIT)
    if slice_shape is None and generator is None and model._modules.get(GENERATOR_NAME) is None:
        slice_shape = default_slice_shape(model, modules)
    gen, new_generator = _resolve_generator(model, slice_shape, code_size, binary, generator, train_generator)
    if gen.binary and init == "fit":
        raise ValueError(_BINARY_FIT)
    params_before = count_parameters(model)
    default = modules is None

    # plan: which convolutions convert, and why the others do not
    convs = [(name, m) for name, m in model.named_modules() if _is_conv_like(m)]
    first = convs[0][0] if convs else None
    chosen = module_filter(modules)
    reasons: dict[int, str | None] = {}
    selected_kernels: set[tuple[int, ...]] = set()
    for name, m in model.named_modules(remove_duplicate=False):
        if not _is_conv_like(m) or isinstance(m, SliceConv) or not chosen(m, name) or id(m) in reasons:
            continue
        selected_kernels.add(_kernel(m))
        reason = unsupported_reason(m, gen.slice_shape)
        if default and name == first:
            reason = _FIRST
        elif default and all(k == 1 for k in _kernel(m)) and not all(k == 1 for k in gen.slice_shape[2:]):
            reason = _POINTWISE
        elif reason is None and (m.weight.device, m.weight.dtype) != (gen.weight.device, gen.weight.dtype):
            if new_generator and not any(r is None for r in reasons.values()):
                gen.to(device=m.weight.device, dtype=m.weight.dtype)  # the new generator follows the model
            else:
                reason = (
                    f"weights on {m.weight.device}/{m.weight.dtype} but the generator is on "
                    f"{gen.weight.device}/{gen.weight.dtype}"
                )
        reasons[id(m)] = reason
    targets = [m for name, m in model.named_modules() if reasons.get(id(m), "") is None]

    fit_norms: dict[int, float] = {}
    if init == "fit" and targets:
        if new_generator and gen.trainable and generator is None:
            # principal directions of the raw slices (minimizes the total squared error; scaling each
            # layer to unit RMS instead gave a worse starting loss on a trained digits CNN)
            sl = [weight_to_slices(m.weight.detach(), gen.slice_shape) for m in targets]
            gen.fit_to_slices_(torch.cat([s for s, _ in sl]), torch.cat([k for _, k in sl]))
        fit_norms = {id(m): float(m.weight.detach().double().norm()) for m in targets}

    def select(module: nn.Module, name: str) -> bool:
        return id(module) in reasons

    def factory(module: nn.Module, name: str) -> nn.Module:
        reason = reasons[id(module)]
        if reason is not None:
            raise Unsupported(reason)
        new = SliceConv.from_conv(module, gen, init=init)
        if init == "fit":
            fit_norms[id(new)] = fit_norms[id(module)]
        return new

    def details(new: nn.Module) -> dict[str, Any]:
        d: dict[str, Any] = {"slices": new.codes.shape[0], "codes": new.codes.numel()}
        if new.fit_error is not None:
            d["fit_error"] = new.fit_error
        return d

    report = replace_modules(
        model, _TECHNIQUE, select, factory, converted_types=SliceConv, details=details, warn=False
    )
    converted_layers = {id(model.get_submodule(c.name)): model.get_submodule(c.name) for c in report.converted}
    if report.converted and new_generator:
        model.add_module(GENERATOR_NAME, gen)
        if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            warnings.warn(
                f"slice_generate: the generator is registered on the converted {type(model).__name__} as "
                f"{GENERATOR_NAME}, so it becomes one of its stages and the {type(model).__name__}'s own forward "
                "fails; convert a module that holds it instead (a LightningModule or an nn.Module with it as an "
                "attribute)",
                stacklevel=2,
            )
    report.params_before = params_before
    report.params_after = count_parameters(model)
    report.extra.update(
        slice_shape=list(gen.slice_shape),
        code_size=gen.code_size,
        binary=gen.binary,
        train_generator=gen.trainable,
        generator_parameters=gen.weight.numel(),
        code_parameters=sum(m.codes.numel() for m in converted_layers.values()),
    )
    if init == "fit" and converted_layers:
        sq_err = sum((m.fit_error * fit_norms[id(m)]) ** 2 for m in converted_layers.values())
        sq_norm = sum(fit_norms[id(m)] ** 2 for m in converted_layers.values())
        report.extra["fit_relative_error"] = math.sqrt(sq_err / sq_norm) if sq_norm else math.sqrt(sq_err)

    _warn(report, default, selected_kernels, gen)
    if report.converted:
        record_conversion(
            model,
            _TECHNIQUE,
            {
                "slice_shape": list(gen.slice_shape),
                "code_size": gen.code_size,
                "binary": gen.binary,
                "train_generator": gen.trainable,
                "init": "kaiming",  # a replay rebuilds the structure; the weights come from the checkpoint
                "modules": [c.name for c in report.converted],
            },
        )
    return report


def _warn(report: ConversionReport, default: bool, kernels: set[tuple[int, ...]], gen: SliceGenerator) -> None:
    by_default = {_FIRST, _POINTWISE}
    if not report.converted and not report.already_converted:
        found = ", ".join(str(k) for k in sorted(kernels)) or "none (no convolution selected)"
        warnings.warn(
            f"slice_generate: no convolution was converted: slice_shape={gen.slice_shape} fits none of the selected "
            f"layers; kernel sizes found: {found}. The slice's trailing dimensions must equal a kernel size.",
            stacklevel=3,
        )
        return
    unexpected = [s for s in report.skipped if s.reason not in by_default]
    if unexpected:
        listing = "; ".join(f"{s.name} ({s.type}): {s.reason}" for s in unexpected)
        warnings.warn(f"slice_generate: skipped {len(unexpected)} convolution(s): {listing}", stacklevel=3)


def fold_slices(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Export: ordinary convolutions holding the generated filters, and no generator (identical outputs).

    The result has a standard state dict that loads into the unconverted architecture. The
    ``slice_generate`` conversion record is dropped, so its checkpoints rebuild nothing.

    Args:
        model: a model converted by :func:`slice_generate` (or a single slice-generated layer).
        inplace: fold ``model`` itself instead of a deep copy.
    """
    if isinstance(model, SliceConv):
        return model.to_conv()
    target = model if inplace else copy.deepcopy(model)
    report = replace_modules(
        target,
        "fold_slices",
        lambda m, name: isinstance(m, SliceConv),
        lambda m, name: m.to_conv(),
        warn=False,
    )
    if not report.converted:
        warnings.warn("fold_slices: the model has no slice-generated convolution; nothing to fold", stacklevel=2)
    for module in list(target.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, SliceGenerator):
                delattr(module, name)
    forget_conversion(target, _TECHNIQUE)
    return target

