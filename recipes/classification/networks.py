"""Classification networks by name: CIFAR ResNets, DenseNet-BC, and any torchvision classifier.

``build_network(name, num_classes, in_channels=3, **options)`` is what :class:`ImageClassifier` calls; the
name is what a YAML config or the command line gives (``--model.init_args.network=densenet_bc``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from recipes.classification.networks_cifar import resnet18_cifar, resnet_cifar_he

__all__ = ["DenseNetBC", "available_networks", "build_network", "densenet_bc"]


class _Bottleneck(nn.Module):
    """DenseNet-BC layer: BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k), output concatenated to the input."""

    def __init__(self, in_channels: int, growth_rate: int, bottleneck: bool) -> None:
        super().__init__()
        inner = 4 * growth_rate if bottleneck else in_channels
        self.bottleneck = bottleneck
        if bottleneck:
            self.bn1 = nn.BatchNorm2d(in_channels)
            self.relu1 = nn.ReLU()
            self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(inner, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu1(self.bn1(x))) if self.bottleneck else x
        out = self.conv2(self.relu2(self.bn2(out)))
        return torch.cat([x, out], 1)


class _Transition(nn.Module):
    """BN-ReLU-Conv1x1 reducing channels by the compression factor, then 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNetBC(nn.Module):
    """DenseNet-BC for 32x32 inputs (Huang et al., CVPR 2017, Sec. 3 and 4.1).

    Three dense blocks of ``(depth - 4) / 6`` bottleneck layers (``(depth - 4) / 3`` plain layers when
    ``bottleneck=False``), transitions that keep ``floor(compression * channels)`` channels, a 3x3 stem with
    ``2 * growth_rate`` channels, global average pooling and a linear classifier.
    """

    def __init__(
        self,
        depth: int = 100,
        growth_rate: int = 12,
        compression: float = 0.5,
        bottleneck: bool = True,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        per_layer = 6 if bottleneck else 3
        if depth < 4 + per_layer or (depth - 4) % per_layer:
            raise ValueError(
                f"depth={depth} is not allowed for DenseNet{'-BC' if bottleneck else ''}: it must be "
                f"{per_layer}n+4 (e.g. {', '.join(str(per_layer * n + 4) for n in (2, 6, 16))})"
            )
        if growth_rate < 1:
            raise ValueError(f"growth_rate={growth_rate} is not allowed; use a positive integer")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression={compression} is not allowed; use a value in (0, 1]")
        n = (depth - 4) // per_layer
        channels = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        for b in range(1, 4):
            block = nn.Sequential()
            for i in range(n):
                block.add_module(f"layer{i + 1}", _Bottleneck(channels, growth_rate, bottleneck))
                channels += growth_rate
            self.add_module(f"block{b}", block)
            if b < 3:
                out = int(math.floor(compression * channels))
                self.add_module(f"trans{b}", _Transition(channels, out))
                channels = out
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.trans1(self.block1(x))
        x = self.trans2(self.block2(x))
        x = self.relu(self.bn(self.block3(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def densenet_bc(
    num_classes: int = 10,
    in_channels: int = 3,
    depth: int = 100,
    growth_rate: int = 12,
    compression: float = 0.5,
    bottleneck: bool = True,
) -> DenseNetBC:
    """DenseNet-BC (L=100, k=12 by default) for CIFAR-size inputs; see :class:`DenseNetBC`."""
    return DenseNetBC(depth, growth_rate, compression, bottleneck, num_classes, in_channels)


def _he(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return resnet_cifar_he(depth, num_classes, in_channels)

    build.__doc__ = f"He et al.'s CIFAR ResNet-{depth}: 3 stages, 16/32/64 channels, option-A shortcuts."
    return build


_OURS: dict[str, Callable[..., nn.Module]] = {
    "resnet18_cifar": resnet18_cifar,
    "resnet20_cifar": _he(20),
    "resnet32_cifar": _he(32),
    "resnet44_cifar": _he(44),
    "resnet56_cifar": _he(56),
    "resnet110_cifar": _he(110),
    "densenet_bc": densenet_bc,
}


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_networks() -> list[str]:
    """Every name :func:`build_network` accepts: the recipe networks, then torchvision's classifiers."""
    return [*_OURS, *_torchvision_names()]


def _adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """Replace the first convolution of a torchvision model by one taking ``in_channels`` inputs."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_channels:
                    return
                new = nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                    child.dilation, child.groups if child.groups == 1 else in_channels, child.bias is not None,
                    child.padding_mode,
                )
                setattr(parent, child_name, new)
                return
    raise ValueError(f"in_channels={in_channels}: found no Conv2d in {type(model).__name__} to adapt")


def build_network(name: str, num_classes: int, in_channels: int = 3, **options: Any) -> nn.Module:
    """Build a classification network by name, randomly initialized (no weights are downloaded).

    Args:
        name: ``resnet18_cifar`` (3x3 stem, no max-pool), ``resnet20/32/44/56/110_cifar`` (He et al.'s
            CIFAR ResNets, option-A shortcuts), ``densenet_bc`` (options ``depth``, ``growth_rate``,
            ``compression``, ``bottleneck``), or any torchvision classification model (``resnet50``,
            ``mobilenet_v3_small``, ...; options go to its constructor).
        num_classes: size of the classifier output.
        in_channels: input channels (1 for the digits); torchvision models get their first conv replaced.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid ones).
        TypeError: options the network does not take.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} is not allowed; use a positive integer")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels={in_channels!r} is not allowed; use a positive integer")
    if name in _OURS:
        factory = _OURS[name]
        try:
            return factory(num_classes=num_classes, in_channels=in_channels, **options)
        except TypeError as err:
            if options and "unexpected keyword" in str(err):
                raise TypeError(f"network {name!r} does not take options {sorted(options)}: {err}") from None
            raise
    tv_names = _torchvision_names()
    if name in tv_names:
        import torchvision

        if options.get("weights") is not None:
            raise ValueError(
                f"network {name!r}: weights={options['weights']!r} is not allowed; recipes build models "
                "with weights=None (no downloads)"
            )
        options.pop("weights", None)
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)
        if in_channels != 3:
            _adapt_input_channels(model, in_channels)
        return model
    raise ValueError(
        f"network={name!r} is not a known network; allowed: {', '.join(_OURS)}, or a torchvision "
        f"classification model: {', '.join(tv_names)}"
    )
