"""``compress_activations``: the functional entry point of activation compression."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from lightning_memcomp.compression.graph import CompiledSaveEngine, has_compiled_parts
from lightning_memcomp.compression.registry import make_codec
from lightning_memcomp.memory.engine import DEFAULT_MIN_BYTES, Codec, SavedTensorEngine
from lightning_memcomp.surgery import ModuleSelection, module_filter

# What is compressed by default: the layers that save large activations in a CNN.
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Dropout,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)


def default_selection(module: nn.Module, name: str) -> bool:
    return isinstance(module, DEFAULT_TYPES)


def compress_activations(
    model: nn.Module,
    codec: str | Codec = "quant",
    bits: int | None = None,
    modules: ModuleSelection = None,
    *,
    min_bytes: int = DEFAULT_MIN_BYTES,
    conv_chunk_bytes: int | None = None,
    **options: Any,
) -> SavedTensorEngine | CompiledSaveEngine:
    """Compress what autograd saves for backward inside the ``with`` block; the forward stays exact.

    Args:
        model: the network; its parameters and buffers are never encoded.
        codec: ``"quant"`` (k-bit, default), ``"blpa"``, ``"wavelet"``, ``"dct"``, ``"threshold"``,
            ``"identity"``, or a :class:`~lightning_memcomp.Codec` instance.
        bits: bit width for ``quant``/``blpa`` (1, 2, 4 or 8; the codec's default is 4).
        modules: which modules' saved tensors to compress (see :mod:`lightning_memcomp.surgery`);
            default: convolutions, linear layers, normalizations, activations, dropout and pooling.
        min_bytes: smaller tensors are kept as they are.
        conv_chunk_bytes: the compressed convolutions' backward decodes the saved input a slice of the batch at
            a time, slices of about this many bytes (``None``, the default: 4 MiB on CPU, 64 MiB on CUDA), so
            their backward needs no full-size decoded copy (:mod:`lightning_memcomp.memory.lean_conv`);
            ``0``: PyTorch's convolution backward on the whole decoded input.
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
    if has_compiled_parts(model):
        if conv_chunk_bytes:
            raise ValueError(
                f"conv_chunk_bytes={conv_chunk_bytes!r} cannot be honoured for a torch.compile'd model: the sliced "
                "convolution backward is eager code the compiled backward does not call; leave it None"
            )
        # the compiled path: pack/unpack as graph code that AOTAutograd inlines (README, "Under torch.compile")
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
        conv_chunk_bytes=conv_chunk_bytes,
    )
