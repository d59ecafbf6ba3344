"""Segmentation DataModules: MONAI's synthetic images (no download) and the Medical Segmentation Decathlon."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["DecathlonDataModule", "SyntheticSegmentationDataModule"]


class _DictDataset(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


class SyntheticSegmentationDataModule(pl.LightningDataModule):
    """Random circles (2-D) or spheres (3-D) in noise, from MONAI's ``create_test_image_2d/3d``.

    Needs no download; deterministic from ``seed``. Items are ``{"image": [1, *size] float, "label":
    [1, *size] long}`` with labels ``0..num_classes-1``.

    Args:
        spatial_dims: 2 (``image_size`` x ``image_size`` images) or 3 (cubes).
        image_size: side of each image/volume.
        num_train, num_val, num_test: sizes of the splits.
        num_objs, rad_min, rad_max: objects per image and their radius range.
        noise_max: amplitude of the uniform noise added to the image.
        num_classes: 2 for foreground/background; more gives objects of several classes.
    """

    in_channels = 1

    def __init__(
        self,
        spatial_dims: int = 2,
        image_size: int = 96,
        num_train: int = 64,
        num_val: int = 16,
        num_test: int = 16,
        num_objs: int = 8,
        rad_min: int = 5,
        rad_max: int = 16,
        noise_max: float = 0.3,
        num_classes: int = 2,
        batch_size: int = 8,
        eval_batch_size: int = 4,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims={spatial_dims!r} is not allowed; use 2 or 3")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} is not allowed; use 2 or more (background included)")
        if not 1 <= rad_min <= rad_max or 2 * rad_max >= image_size:
            raise ValueError(
                f"rad_min={rad_min}, rad_max={rad_max}, image_size={image_size}: need 1 <= rad_min <= rad_max "
                "and 2 * rad_max < image_size"
            )
        if min(num_train, num_val, num_test) < 1:
            raise ValueError(f"num_train={num_train}, num_val={num_val}, num_test={num_test}: each must be >= 1")
        self.save_hyperparameters()
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        self._splits: dict[str, _DictDataset] = {}

    def _make(self, n: int, rng: np.random.RandomState) -> _DictDataset:
        from monai.data import create_test_image_2d, create_test_image_3d

        hp = self.hparams
        images, labels = [], []
        for _ in range(n):
            size = (hp.image_size,) * hp.spatial_dims
            make = create_test_image_2d if hp.spatial_dims == 2 else create_test_image_3d
            im, seg = make(*size, num_objs=hp.num_objs, rad_max=hp.rad_max, rad_min=hp.rad_min,
                           noise_max=hp.noise_max, num_seg_classes=hp.num_classes - 1, random_state=rng)
            images.append(torch.from_numpy(np.ascontiguousarray(im, dtype=np.float32)))
            labels.append(torch.from_numpy(np.ascontiguousarray(seg)).long())
        return _DictDataset(torch.stack(images).unsqueeze(1), torch.stack(labels).unsqueeze(1))

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        hp = self.hparams
        rng = np.random.RandomState(hp.seed)
        self._splits = {"train": self._make(hp.num_train, rng), "val": self._make(hp.num_val, rng),
                        "test": self._make(hp.num_test, rng)}

    def _loader(self, split: str, train: bool) -> torch.utils.data.DataLoader:
        hp = self.hparams
        return torch.utils.data.DataLoader(self._splits[split], batch_size=hp.batch_size if train else
                                           hp.eval_batch_size, shuffle=train, num_workers=hp.num_workers)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("test", False)


DECATHLON_TASKS = (
    "Task01_BrainTumour", "Task02_Heart", "Task03_Liver", "Task04_Hippocampus", "Task05_Prostate",
    "Task06_Lung", "Task07_Pancreas", "Task08_HepaticVessel", "Task09_Spleen", "Task10_Colon",
)


class DecathlonDataModule(pl.LightningDataModule):
    """A Medical Segmentation Decathlon task (``Task09_Spleen`` by default) through MONAI's ``DecathlonDataset``.

    Transform chain (the usual MONAI one): load NIfTI, channel first, RAS orientation, resampling to
    ``pixdim`` (bilinear image, nearest label), intensity window ``intensity_range`` scaled to [0, 1] and
    clipped, crop to the foreground, and for training ``num_samples`` random ``roi_size`` crops per
    volume balanced between positive (label) and negative centres. Validation and test use whole volumes
    (``batch 1``, for sliding-window inference). The Decathlon's own test images have no labels, so the
    test split here is the held-out validation split (``val_frac`` of the training list, seeded).

    Args:
        root_dir: folder holding ``<task>/dataset.json``, ``imagesTr/`` and ``labelsTr/`` (or where to download).
        task: the Decathlon task name.
        download: fetch the task's archive (Spleen: about 1.5 GB) when missing.

    Raises:
        FileNotFoundError: the task folder is missing and ``download`` is off.
    """

    spatial_dims = 3

    def __init__(
        self,
        root_dir: str = "data",
        task: str = "Task09_Spleen",
        download: bool = False,
        pixdim: Sequence[float] = (1.5, 1.5, 2.0),
        intensity_range: Sequence[float] = (-57.0, 164.0),
        roi_size: Sequence[int] = (96, 96, 96),
        num_samples: int = 4,
        batch_size: int = 2,
        val_frac: float = 0.2,
        cache_rate: float = 0.0,
        num_workers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if task not in DECATHLON_TASKS:
            raise ValueError(f"task={task!r} is not allowed; use one of {', '.join(DECATHLON_TASKS)}")
        if len(pixdim) != 3 or len(roi_size) != 3:
            raise ValueError(f"pixdim={list(pixdim)} and roi_size={list(roi_size)} need 3 entries each (volumes)")
        if len(intensity_range) != 2 or intensity_range[0] >= intensity_range[1]:
            raise ValueError(f"intensity_range={list(intensity_range)} is not allowed; give (low, high), low < high")
        if not 0.0 < val_frac < 1.0:
            raise ValueError(f"val_frac={val_frac!r} is not allowed; use a value in (0, 1)")
        self.save_hyperparameters()
        self.in_channels: int | None = None
        self.num_classes: int | None = None
        self._train: Dataset | None = None
        self._val: Dataset | None = None

    @property
    def task_dir(self) -> Path:
        return Path(self.hparams.root_dir).expanduser().resolve() / self.hparams.task

    def check_data(self) -> None:
        """Raise ``FileNotFoundError`` (saying where it looked and how to fetch it) when the data is neither
        here nor to be downloaded; ``memcomp`` calls it before building the Trainer."""
        if self.hparams.download or (self.task_dir / "dataset.json").is_file():
            return
        raise FileNotFoundError(
            f"DecathlonDataModule: no {self.hparams.task} data at {self.task_dir} (expected dataset.json, "
            f"imagesTr/ and labelsTr/ there; root_dir={self.hparams.root_dir!r}). Fetch it with "
            "--data.init_args.download=true (from the Medical Segmentation Decathlon, "
            "http://medicaldecathlon.com), or point --data.init_args.root_dir at the folder that holds "
            f"{self.hparams.task}/"
        )

    def _read_properties(self) -> None:
        meta = json.loads((self.task_dir / "dataset.json").read_text())
        self.num_classes = len(meta.get("labels", {})) or None
        self.in_channels = len(meta.get("modality", {})) or None

    def prepare_data(self) -> None:
        self.check_data()
        if self.hparams.download:
            from monai.apps import DecathlonDataset

            DecathlonDataset(self.hparams.root_dir, self.hparams.task, "training", download=True, cache_rate=0.0)

    def _transforms(self, train: bool) -> Any:
        from monai import transforms as T

        hp = self.hparams
        keys = ["image", "label"]
        steps: list[Any] = [
            T.LoadImaged(keys=keys),
            T.EnsureChannelFirstd(keys=keys),
            T.Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            T.Spacingd(keys=keys, pixdim=tuple(hp.pixdim), mode=("bilinear", "nearest")),
            T.ScaleIntensityRanged(keys=["image"], a_min=hp.intensity_range[0], a_max=hp.intensity_range[1],
                                   b_min=0.0, b_max=1.0, clip=True),
            T.CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
        ]
        if train:
            steps += [
                T.SpatialPadd(keys=keys, spatial_size=tuple(hp.roi_size)),
                T.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=tuple(hp.roi_size), pos=1,
                                         neg=1, num_samples=hp.num_samples, image_key="image", image_threshold=0),
            ]
        return T.Compose(steps)

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        from monai.apps import DecathlonDataset

        self.check_data()
        self._read_properties()
        hp = self.hparams
        common = dict(root_dir=hp.root_dir, task=hp.task, download=False, seed=hp.seed, val_frac=hp.val_frac,
                      cache_rate=hp.cache_rate, num_workers=max(hp.num_workers, 1), progress=False)
        self._train = DecathlonDataset(section="training", transform=self._transforms(True), **common)
        self._val = DecathlonDataset(section="validation", transform=self._transforms(False), **common)
        if len(self._val) == 0:
            raise ValueError(
                f"val_frac={hp.val_frac} of {len(self._train)} training volumes leaves no validation volume; "
                "raise val_frac or add volumes"
            )

    def _loader(self, data: Dataset | None, train: bool) -> Any:
        from monai.data import DataLoader

        hp = self.hparams
        return DataLoader(data, batch_size=hp.batch_size if train else 1, shuffle=train,
                          num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0)

    def train_dataloader(self) -> Any:
        return self._loader(self._train, True)

    def val_dataloader(self) -> Any:
        return self._loader(self._val, False)

    def test_dataloader(self) -> Any:
        return self._loader(self._val, False)

    def predict_dataloader(self) -> Any:
        return self._loader(self._val, False)
