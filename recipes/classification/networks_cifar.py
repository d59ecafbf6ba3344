"""CIFAR-style ResNets: ResNet-18 with a 3x3 stem and no max-pool, and He et al.'s ResNet-20/56/110."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm; shortcut by 1x1 conv (``"B"``) or subsample + zero-pad (``"A"``)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut_kind = shortcut
        self.shortcut: nn.Module = nn.Identity()
        self.pad = 0
        self.stride = stride
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.pad = planes - in_planes
            elif shortcut == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )
            else:
                raise ValueError(f"shortcut={shortcut!r} is not allowed; use 'A' (parameter-free) or 'B' (1x1 conv)")

    def _identity(self, x: Tensor) -> Tensor:
        if self.shortcut_kind == "A" and (self.stride != 1 or self.pad):
            x = x[:, :, :: self.stride, :: self.stride]
            return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return self.shortcut(x)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self._identity(x))


class ResNetCIFAR(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem, no max-pool, global average pool, linear classifier."""

    def __init__(
        self,
        blocks: list[int],
        widths: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: str = "B",
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers = []
        in_planes = widths[0]
        for i, (n, width) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n):
                stage.append(BasicBlock(in_planes, width, stride if j == 0 else 1, shortcut))
                in_planes = width
            layers.append(nn.Sequential(*stage))
        self.layers = nn.ModuleList(layers)
        for i, layer in enumerate(layers, start=1):
            self.add_module(f"layer{i}", layer)
        del self.layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self.num_stages = len(layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNetCIFAR:
    """ResNet-18 adapted to CIFAR: 3x3 stem, no max-pool, 1x1-conv shortcuts (the band-limiting paper's net)."""
    return ResNetCIFAR([2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels, shortcut="B")


def resnet_cifar_he(depth: int = 56, num_classes: int = 10, in_channels: int = 3) -> ResNetCIFAR:
    """He et al. (2016) CIFAR ResNet-(6n+2): 3 stages of n basic blocks, 16/32/64 channels, option-A shortcuts."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth={depth} is not 6n+2 (20, 32, 44, 56, 110, ...)")
    n = (depth - 2) // 6
    return ResNetCIFAR([n, n, n], [16, 32, 64], num_classes, in_channels, shortcut="A")


def resnet56_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNetCIFAR:
    return resnet_cifar_he(56, num_classes, in_channels)
