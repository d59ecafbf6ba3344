"""Classification recipe: networks, data and the ImageClassifier LightningModule."""

from recipes.classification.data import CIFARDataModule, DigitsDataModule
from recipes.classification.module import ImageClassifier
from recipes.classification.networks import DenseNetBC, available_networks, build_network, densenet_bc
from recipes.classification.networks_cifar import resnet18_cifar, resnet56_cifar, resnet_cifar_he

__all__ = [
    "CIFARDataModule",
    "DenseNetBC",
    "DigitsDataModule",
    "ImageClassifier",
    "available_networks",
    "build_network",
    "densenet_bc",
    "resnet18_cifar",
    "resnet56_cifar",
    "resnet_cifar_he",
]
