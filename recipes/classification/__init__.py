"""Classification recipe: networks, data and the ImageClassifier LightningModule."""

from recipes.classification.networks_cifar import resnet18_cifar, resnet56_cifar, resnet_cifar_he

__all__ = ["resnet18_cifar", "resnet56_cifar", "resnet_cifar_he"]
