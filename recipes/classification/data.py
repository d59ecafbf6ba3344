"""Classification DataModules: the embedded digits (no download) and CIFAR-10/100 through torchvision."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from recipes.classification.digits import load_digits_32

__all__ = ["CIFARDataModule", "DigitsDataModule"]


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's handwritten digits (bundled, no download) resized to 32x32.

    A deterministic 70/10/20 train/val/test split (1,257 / 179 / 361 images) from ``seed``.

    Args:
        batch_size: training batch size (evaluation uses ``eval_batch_size``).
        channels: 1 (the digits are grey) or 3 (repeated, for networks that expect RGB).
        size: image side after resizing.
        seed: the split's seed.
        augment: random +-2 pixel shifts during training.
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        channels: int = 1,
        size: int = 32,
        seed: int = 0,
        augment: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} is not allowed; use 1 or 3")
        if size < 8:
            raise ValueError(f"size={size!r} is not allowed; use 8 or more")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}, eval_batch_size={eval_batch_size!r}: use positive sizes")
        self.save_hyperparameters()
        self.in_channels = channels
        self._splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        hp = self.hparams
        data = load_digits_32(size=hp.size, channels=hp.channels, seed=hp.seed)
        self._splits = {name: TensorDataset(x, y) for name, (x, y) in data.items()}

    def _loader(self, split: str, train: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            self._splits[split],
            batch_size=hp.batch_size if train else hp.eval_batch_size,
            shuffle=train,
            drop_last=False,
            num_workers=hp.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def on_after_batch_transfer(self, batch: list, dataloader_idx: int) -> list:
        if self.hparams.augment and self.trainer is not None and self.trainer.training:
            x, y = batch
            shift = torch.randint(-2, 3, (2,)).tolist()
            batch = [torch.roll(x, shifts=shift, dims=(2, 3)), y]
        return batch


_CIFAR = {
    "cifar10": {"folder": "cifar-10-batches-py", "classes": 10, "mean": (0.4914, 0.4822, 0.4465),
                "std": (0.2470, 0.2435, 0.2616)},
    "cifar100": {"folder": "cifar-100-python", "classes": 100, "mean": (0.5071, 0.4865, 0.4409),
                 "std": (0.2673, 0.2564, 0.2762)},
}


def _cifar_class(dataset: str, verify_md5: bool) -> type:
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if dataset == "cifar10" else CIFAR100
    if verify_md5:
        return base

    class _CIFAR(base):  # type: ignore[misc, valid-type]
        # torchvision hashes all ~170 MB on every construction; checking that the files exist is enough
        # for loading (``download=True`` still verifies what it downloads).
        def _check_integrity(self) -> bool:
            root = Path(self.root) / self.base_folder
            return all((root / name).is_file() for name, _ in (*self.train_list, *self.test_list))

        def _load_meta(self) -> None:
            path = Path(self.root) / self.base_folder / self.meta["filename"]
            if not path.is_file():
                raise RuntimeError(f"Dataset metadata file {path} not found")
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
            self.classes = data[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    _CIFAR.__name__ = base.__name__
    return _CIFAR


class CIFARDataModule(pl.LightningDataModule):
    """CIFAR-10 or CIFAR-100 through torchvision, with the standard crop + flip augmentation.

    The last ``val_fraction`` of a fixed permutation of the 50,000 training images is the validation
    split (seeded, without augmentation); the official 10,000-image test set is the test split.

    Args:
        data_dir: folder holding ``cifar-10-batches-py`` / ``cifar-100-python`` (or where to download).
        dataset: ``"cifar10"`` or ``"cifar100"``.
        download: fetch the archive (~170 MB) from the dataset's home page when missing.
        verify_md5: hash the files on load, as torchvision does by default (slow; off: presence only).

    Raises:
        FileNotFoundError: the data is missing and ``download`` is off (the message says where it
            looked and how to fetch it).
    """

    def __init__(
        self,
        data_dir: str = "data",
        dataset: str = "cifar10",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        val_fraction: float = 0.1,
        augment: bool = True,
        seed: int = 0,
        num_workers: int = 2,
        verify_md5: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in _CIFAR:
            raise ValueError(f"dataset={dataset!r} is not allowed; use one of {', '.join(_CIFAR)}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction!r} is not allowed; use a value in [0, 1)")
        self.save_hyperparameters()
        self.num_classes = _CIFAR[dataset]["classes"]
        self.in_channels = 3
        self._train: Dataset | None = None
        self._val: Dataset | None = None
        self._test: Dataset | None = None

    @property
    def folder(self) -> Path:
        return Path(self.hparams.data_dir).expanduser().resolve() / _CIFAR[self.hparams.dataset]["folder"]

    def check_data(self) -> None:
        """Raise ``FileNotFoundError`` (saying where it looked and how to fetch it) when the data is neither
        here nor to be downloaded; ``memcomp`` calls it before building the Trainer."""
        if self.hparams.download or self.folder.is_dir():
            return
        raise FileNotFoundError(
            f"CIFARDataModule: no {self.hparams.dataset} data at {self.folder} (looked there because "
            f"data_dir={self.hparams.data_dir!r}). Fetch it with --data.init_args.download=true (about 170 MB "
            "from https://www.cs.toronto.edu/~kriz/cifar.html), or point --data.init_args.data_dir at the "
            f"folder that holds {_CIFAR[self.hparams.dataset]['folder']}/"
        )

    def prepare_data(self) -> None:
        self.check_data()
        if self.hparams.download:
            cls = _cifar_class(self.hparams.dataset, True)
            cls(self.hparams.data_dir, train=True, download=True)
            cls(self.hparams.data_dir, train=False, download=True)

    def _transforms(self, train: bool):  # noqa: ANN202 - torchvision transform
        from torchvision import transforms as T

        info = _CIFAR[self.hparams.dataset]
        steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train and self.hparams.augment else []
        return T.Compose([*steps, T.ToTensor(), T.Normalize(info["mean"], info["std"])])

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        self.check_data()
        hp = self.hparams
        cls = _cifar_class(hp.dataset, hp.verify_md5)
        root = os.fspath(Path(hp.data_dir).expanduser())
        try:
            train_aug = cls(root, train=True, transform=self._transforms(True), download=False)
            train_plain = cls(root, train=True, transform=self._transforms(False), download=False)
            self._test = cls(root, train=False, transform=self._transforms(False), download=False)
        except RuntimeError as err:
            raise FileNotFoundError(
                f"CIFARDataModule: the {hp.dataset} files in {self.folder} are incomplete or corrupted ({err}); "
                "delete the folder and fetch it again with --data.init_args.download=true"
            ) from err
        n = len(train_aug)
        n_val = int(round(hp.val_fraction * n))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(hp.seed)).tolist()
        self._train = Subset(train_aug, perm[: n - n_val])
        self._val = Subset(train_plain, perm[n - n_val :]) if n_val else None

    def _loader(self, data: Dataset | None, train: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            data, batch_size=hp.batch_size if train else hp.eval_batch_size, shuffle=train,
            num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0, pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._train, True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self._val, False) if self._val is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._test, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._test, False)
