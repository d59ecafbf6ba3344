"""Segmentation networks by name, from MONAI: UNet (2-D and 3-D), SegResNet, DynUNet."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["SEGMENTATION_NETWORKS", "build_segmentation_network"]

SEGMENTATION_NETWORKS = ("unet", "segresnet", "dynunet")


def build_segmentation_network(
    name: str,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    num_res_units: int = 2,
    **options: Any,
) -> nn.Module:
    """A MONAI segmentation network.

    Args:
        name: ``"unet"`` (``monai.networks.nets.UNet``, residual units), ``"segresnet"`` (``init_filters``
            = ``channels[0]``) or ``"dynunet"`` (nnU-Net style: 3x3 kernels, ``filters`` = ``channels``,
            first stage stride 1 then ``strides``).
        spatial_dims: 2 or 3.
        channels, strides: encoder widths and the downsampling between them (``len(strides) ==
            len(channels) - 1``), for ``unet`` and ``dynunet``.
        **options: further keyword options of the MONAI class.

    Raises:
        ValueError: unknown name (lists the valid ones), spatial_dims not 2 or 3, inconsistent lengths.
    """
    from monai.networks.nets import DynUNet, SegResNet, UNet

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims={spatial_dims!r} is not allowed; use 2 or 3")
    channels, strides = list(channels), list(strides)
    if name in ("unet", "dynunet") and len(strides) != len(channels) - 1:
        raise ValueError(
            f"strides={strides} and channels={channels}: {name} needs len(strides) == len(channels) - 1"
        )
    if name == "unet":
        return UNet(spatial_dims, in_channels, out_channels, channels, strides, num_res_units=num_res_units,
                    **options)
    if name == "segresnet":
        return SegResNet(spatial_dims=spatial_dims, init_filters=channels[0], in_channels=in_channels,
                         out_channels=out_channels, **options)
    if name == "dynunet":
        options.setdefault("res_block", num_res_units > 0)
        return DynUNet(spatial_dims, in_channels, out_channels, kernel_size=[3] * len(channels),
                       strides=[1, *strides], upsample_kernel_size=strides, filters=channels, **options)
    raise ValueError(f"network={name!r} is not a known segmentation network; allowed: {', '.join(SEGMENTATION_NETWORKS)}")
