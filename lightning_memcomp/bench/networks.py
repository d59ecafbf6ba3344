"""The networks the benchmark runs by name (``--network``), with their default inputs, and the random batch."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from lightning_memcomp.bench.config import BenchConfig

__all__ = ["NetworkSpec", "TinyCNN", "random_batch", "resolve_network"]


@dataclass
class NetworkSpec:
    """A network by name, with the input it is benchmarked on."""

    name: str
    task: str  # "classification" or "segmentation"
    spatial_dims: int
    batch_size: int
    input_size: int
    in_channels: int
    num_classes: int
    build: Callable[[], nn.Module]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch_size, self.in_channels, *(self.input_size,) * self.spatial_dims)


class _TinyBlock(nn.Module):
    """Conv-BN-ReLU twice: a block for checkpointing in the tiny smoke-test network."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class TinyCNN(nn.Module):
    """A 3x3 stem and two 16-channel blocks, 4x4 pooled head: ``--network tiny_cnn`` for smoke tests."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.block1 = _TinyBlock(width, width)
        self.pool = nn.MaxPool2d(2)
        self.block2 = _TinyBlock(width, width)
        self.head_pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(width * 16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.block1(self.relu(self.bn(self.stem(x)))))
        return self.fc(torch.flatten(self.head_pool(self.block2(x)), 1))


_SEGMENTATION = re.compile(r"^(unet|segresnet|dynunet)([23])d$")


def _classification_builder(name: str) -> Callable[..., nn.Module]:
    try:
        from recipes.classification.networks import available_networks, build_network
    except ModuleNotFoundError:  # a checkout without the classification recipe: the CIFAR ResNet-18 only
        from recipes.classification.networks_cifar import resnet18_cifar

        if name != "resnet18_cifar":
            raise ValueError(f"--network={name!r} is not known; allowed: tiny_cnn, resnet18_cifar, unet2d, unet3d") from None
        return resnet18_cifar
    if name not in available_networks():
        raise ValueError(
            f"--network={name!r} is not known; allowed: tiny_cnn, unet2d, unet3d, segresnet2d/3d, dynunet2d/3d, "
            f"or a classification network of the recipes ({', '.join(available_networks()[:8])}, ..., any "
            "torchvision classifier)"
        )
    return lambda num_classes, in_channels: build_network(name, num_classes=num_classes, in_channels=in_channels)


def resolve_network(cfg: BenchConfig) -> NetworkSpec:
    """The network ``cfg.network`` names, with its default input where ``cfg`` leaves it open.

    Names: ``tiny_cnn`` (built in, for smoke tests), ``unet2d``/``unet3d`` (MONAI UNet, channels
    16-32-64-128, strides 2, two residual units), ``segresnet2d/3d``, ``dynunet2d/3d`` (from the
    segmentation recipe), and every classification network of the recipes (``resnet18_cifar``,
    ``resnet56_cifar``, ``densenet_bc``, torchvision classifiers).

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    name = cfg.network
    seg = _SEGMENTATION.match(name)
    if seg:
        arch, dims = seg.group(1), int(seg.group(2))
        size = cfg.input_size or (64 if dims == 3 else 128)
        batch = cfg.batch_size or (2 if dims == 3 else 8)
        cin, cout = cfg.in_channels or 1, cfg.num_classes or 2

        def build_seg() -> nn.Module:
            try:
                from recipes.segmentation.networks import build_segmentation_network
            except ModuleNotFoundError:
                if arch != "unet":
                    raise ValueError(f"--network={name!r} needs the segmentation recipe, which is not installed") from None
                from monai.networks.nets import UNet

                return UNet(dims, cin, cout, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)
            return build_segmentation_network(arch, dims, cin, cout)

        return NetworkSpec(name, "segmentation", dims, batch, size, cin, cout, build_seg)
    if name == "tiny_cnn":
        cin, classes = cfg.in_channels or 1, cfg.num_classes or 10
        return NetworkSpec(name, "classification", 2, cfg.batch_size or 32, cfg.input_size or 32, cin, classes,
                           lambda: TinyCNN(cin, classes))
    builder = _classification_builder(name)
    cin, classes = cfg.in_channels or 3, cfg.num_classes or 10
    return NetworkSpec(name, "classification", 2, cfg.batch_size or 128, cfg.input_size or 32, cin, classes,
                       lambda: builder(num_classes=classes, in_channels=cin))


def random_batch(spec: NetworkSpec, device: torch.device, seed: int, batch: int | None = None
                 ) -> tuple[Tensor, Tensor]:
    """A fixed random input and labels of ``spec``'s shape (``batch`` samples instead of its batch size)."""
    if batch is not None:
        spec = replace(spec, batch_size=batch)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(spec.input_shape, generator=gen)
    if spec.task == "classification":
        y = torch.randint(0, spec.num_classes, (spec.batch_size,), generator=gen)
    else:
        y = torch.randint(0, spec.num_classes, (spec.batch_size, *spec.input_shape[2:]), generator=gen)
    return x.to(device), y.to(device)
