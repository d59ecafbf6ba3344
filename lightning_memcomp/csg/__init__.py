"""Convolutional slice generators, CSG and BCSG (Omidvar et al., "Associative Convolutional Layers", AISTATS 2021).

* :func:`slice_generate` converts a network in place; :func:`fold_slices` exports ordinary convolutions;
* :class:`ConvSliceGeneration` is the Lightning callback;
* :class:`SliceGenerator` is the shared code-to-slice map, :class:`SliceConv1d`/``2d``/``3d`` the layers.
"""

from typing import Any

from lightning_memcomp.csg.convert import (
    DEFAULT_CODE_SIZE,
    DEFAULT_SLICE_SHAPE,
    DEFAULT_SLICE_SHAPES,
    default_slice_shape,
    fold_slices,
    slice_generate,
)
from lightning_memcomp.csg.generator import GENERATOR_NAME, SliceGenerator
from lightning_memcomp.csg.layers import SliceConv, SliceConv1d, SliceConv2d, SliceConv3d

__all__ = [
    "DEFAULT_CODE_SIZE",
    "DEFAULT_SLICE_SHAPE",
    "DEFAULT_SLICE_SHAPES",
    "GENERATOR_NAME",
    "ConvSliceGeneration",
    "SliceConv",
    "SliceConv1d",
    "SliceConv2d",
    "SliceConv3d",
    "SliceGenerator",
    "default_slice_shape",
    "fold_slices",
    "slice_generate",
]


def __getattr__(name: str) -> Any:
    # the callback imports Lightning; the functional core does not need it
    if name == "ConvSliceGeneration":
        from lightning_memcomp.csg.callback import ConvSliceGeneration

        return ConvSliceGeneration
    raise AttributeError(f"module 'lightning_memcomp.csg' has no attribute {name!r}")
