"""Segmentation recipe: MONAI networks, synthetic and Decathlon data, the Segmenter LightningModule."""

from recipes.segmentation.data import DecathlonDataModule, SyntheticSegmentationDataModule
from recipes.segmentation.module import Segmenter
from recipes.segmentation.networks import SEGMENTATION_NETWORKS, build_segmentation_network

__all__ = [
    "SEGMENTATION_NETWORKS",
    "DecathlonDataModule",
    "Segmenter",
    "SyntheticSegmentationDataModule",
    "build_segmentation_network",
]
