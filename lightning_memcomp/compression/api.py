"""``compress_activations``: the functional entry point of activation compression."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from lightning_memcomp.compression.fallback import TransformOrQuant
from lightning_memcomp.compression.graph import CompiledSaveEngine, has_compiled_parts
from lightning_memcomp.compression.quant import QuantCodec
from lightning_memcomp.compression.registry import make_codec
from lightning_memcomp.compression.smooth import PrecisionPolicy
from lightning_memcomp.compression.threshold import TopKCodec
from lightning_memcomp.memory.engine import DEFAULT_MIN_BYTES, Codec, SavedTensorEngine
from lightning_memcomp.surgery import ModuleSelection, module_filter


def default_selection(module: nn.Module, name: str) -> bool:
    """The default ``modules=``: every module, the root included, so every floating activation the forward saves
    above ``min_bytes`` is compressed, wherever it is saved: inside leaf layers, in a container's own ``forward``
    code (squeeze-excitation and layer-scale multiplies, ``permute`` + norm blocks), by functional calls and by
    activation classes of any library. Parameters and buffers are never encoded."""
    return True


def resolve_policy(policy: Any, codec: Codec) -> PrecisionPolicy | None:
    """The :class:`PrecisionPolicy` that ``policy=`` asks for (``"default"``, ``None``/``"off"``, a policy or a dict
    of its fields); none for a codec that does not compress (the identity keeps tensors as they are)."""
    if policy is None or policy is False or policy == "off":
        return None
    if isinstance(policy, str) and policy == "default":
        resolved = PrecisionPolicy()
    elif isinstance(policy, PrecisionPolicy):
        resolved = policy
    elif isinstance(policy, dict):
        unknown = sorted(set(policy) - set(PrecisionPolicy.__dataclass_fields__))
        if unknown:
            raise ValueError(f"policy={policy!r}: unknown field(s) {unknown}; allowed: "
                             f"{', '.join(PrecisionPolicy.__dataclass_fields__)}")
        resolved = PrecisionPolicy(**policy)
    else:
        raise ValueError(
            f"policy={policy!r} is not allowed; use 'default', 'off' (or None), a "
            "lightning_memcomp.PrecisionPolicy, or a dict of its fields (smooth, derivative_bits, transform_max_error, "
            "fallback_bits)"
        )
    return resolved if codec.compresses else None


def compress_activations(
    model: nn.Module,
    codec: str | Codec = "quant",
    bits: int | None = None,
    modules: ModuleSelection = None,
    *,
    min_bytes: int = DEFAULT_MIN_BYTES,
    conv_chunk_bytes: int | None = None,
    policy: str | PrecisionPolicy | dict[str, Any] | None = "default",
    **options: Any,
) -> SavedTensorEngine | CompiledSaveEngine:
    """Compress what autograd saves for backward inside the ``with`` block; the forward stays exact.

    Args:
        model: the network; its parameters and buffers are never encoded.
        codec: ``"quant"`` (k-bit, default), ``"blpa"``, ``"wavelet"``, ``"dct"``, ``"threshold"``,
            ``"identity"``, or a :class:`~lightning_memcomp.Codec` instance.
        bits: bit width for ``quant``/``blpa`` (1, 2, 4 or 8; the codec's default is 4).
        modules: which modules' saved tensors to compress (see :mod:`lightning_memcomp.surgery`); default:
            every module, so everything the forward saves (:func:`default_selection`). What a selection leaves
            out is kept as it is and counted under ``"not selected"`` in ``ledger.left_as_is()``.
        min_bytes: smaller tensors are kept as they are.
        conv_chunk_bytes: the compressed convolutions' backward decodes the saved input a slice of the batch at
            a time, slices of about this many bytes (``None``, the default: 4 MiB on CPU, 64 MiB on CUDA), so
            their backward needs no full-size decoded copy (:mod:`lightning_memcomp.memory.lean_conv`);
            ``0``: PyTorch's convolution backward on the whole decoded input.
        policy: what some saved tensors get instead of the bulk codec: ``"default"``
            (:class:`~lightning_memcomp.PrecisionPolicy`: smooth activations such as SiLU, GELU, Hardswish, Sigmoid
            keep their derivative in 8 bits, which keeps gradients right on EfficientNet/MobileNet/ConvNeXt),
            ``"off"``/``None`` (the bulk codec everywhere), a policy, or a dict of its fields. Not applied to the
            identity codec, nor inside ``torch.compile``'d graphs (a policy given explicitly warns there).
        **options: the codec's own options (``group_size``, ``compression_ratio``, ``wavelet``, ...).

    A ``torch.compile``'d model (or one with compiled submodules) gets a
    :class:`~lightning_memcomp.compression.graph.CompiledSaveEngine` instead: the ``quant``, ``blpa`` and
    ``identity`` codecs run as graph code inside the compiled forward and backward; the other codecs are
    refused with the reason (README, "Under torch.compile").

    Returns the engine; entering it returns the :class:`~lightning_memcomp.Ledger`::

        with compress_activations(model, codec="quant", bits=4) as ledger:
            loss = criterion(model(x), y)
        loss.backward()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"compress_activations: model={model!r} is a {type(model).__name__}, not a torch.nn.Module; pass the "
            "network itself (e.g. torchvision.models.resnet18()), not its name"
        )
    if bits is not None:
        options["bits"] = bits
    codec_obj = make_codec(codec, **options)
    precision = resolve_policy(policy, codec_obj)
    if (precision is not None and precision.transform_max_error is not None and isinstance(codec_obj, TopKCodec)
            and codec_obj.compression_ratio != 1):  # lambda 1: the paper's exact baseline, kept as it is
        codec_obj = TransformOrQuant(codec_obj, QuantCodec(bits=precision.fallback_bits), precision.transform_max_error)
    if has_compiled_parts(model):
        if conv_chunk_bytes:
            raise ValueError(
                f"conv_chunk_bytes={conv_chunk_bytes!r} cannot be honoured for a torch.compile'd model: the sliced "
                "convolution backward is eager code the compiled backward does not call; leave it None"
            )
        # the compiled path: pack/unpack as graph code that AOTAutograd inlines (README, "Under torch.compile")
        if precision is not None and precision.smooth and policy != "default":
            warnings.warn(
                f"compress_activations: policy={precision!r} is not applied inside torch.compile'd graphs: smooth "
                "activations save their input, coded by the bulk codec; pass policy='off' to silence this",
                stacklevel=2,
            )
        return CompiledSaveEngine(model, codec_obj, min_bytes=min_bytes, modules=modules)
    select = module_filter(modules, default_selection)
    matched = [name for name, m in model.named_modules() if select(m, name)]
    if not matched:
        warnings.warn(
            f"compress_activations: modules={modules!r} matched no module of {type(model).__name__}; "
            "nothing will be compressed",
            stacklevel=2,
        )
    chosen = set(matched)
    return SavedTensorEngine(
        model, lambda name, module: codec_obj if name in chosen else None, min_bytes=min_bytes,
        conv_chunk_bytes=conv_chunk_bytes, policy=precision,
    )
