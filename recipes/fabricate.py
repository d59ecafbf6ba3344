"""Write tiny datasets in the real on-disk formats, for tests and for trying a recipe without a download.

* :func:`write_cifar`: ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or
  ``cifar-100-python/`` (``train``, ``test``, ``meta``): pickled dicts with ``data`` as ``N x 3072`` uint8
  rows (R, G, B planes of 32x32), as torchvision reads them.
* :func:`write_decathlon`: ``<task>/dataset.json``, ``imagesTr/*.nii.gz``, ``labelsTr/*.nii.gz`` and
  ``imagesTs/*.nii.gz``, as MONAI's ``DecathlonDataset`` reads them; CT-like intensities with a bright
  ellipsoid "organ" that is the label.

The images are random: they exercise loading, transforms and training steps, not accuracy.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["write_cifar", "write_decathlon"]


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar(root: str | Path, dataset: str = "cifar10", per_batch: int = 8, test: int = 8, seed: int = 0) -> Path:
    """Write a CIFAR-10 (5 training batches of ``per_batch`` images) or CIFAR-100 (``5 * per_batch``
    training images) folder under ``root``; returns the dataset folder."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    if dataset == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, 6):
            _dump(folder / f"data_batch_{i}", {
                "batch_label": f"training batch {i} of 5",
                "labels": rng.integers(0, 10, per_batch).tolist(),
                "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)],
            })
        _dump(folder / "test_batch", {
            "batch_label": "testing batch 1 of 1",
            "labels": rng.integers(0, 10, test).tolist(),
            "data": rng.integers(0, 256, (test, 3072), dtype=np.uint8),
            "filenames": [f"test_{j}.png" for j in range(test)],
        })
        _dump(folder / "batches.meta", {
            "num_cases_per_batch": per_batch,
            "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"],
            "num_vis": 3072,
        })
        return folder
    if dataset == "cifar100":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for name, n in (("train", 5 * per_batch), ("test", test)):
            fine = rng.integers(0, 100, n)
            _dump(folder / name, {
                "filenames": [f"{name}_{j}.png" for j in range(n)],
                "batch_label": f"{name}ing batch 1 of 1",
                "fine_labels": fine.tolist(),
                "coarse_labels": (fine // 5).tolist(),
                "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            })
        _dump(folder / "meta", {
            "fine_label_names": [f"class_{i}" for i in range(100)],
            "coarse_label_names": [f"superclass_{i}" for i in range(20)],
        })
        return folder
    raise ValueError(f"dataset={dataset!r} is not allowed; use 'cifar10' or 'cifar100'")


def write_decathlon(
    root: str | Path,
    task: str = "Task09_Spleen",
    num_training: int = 5,
    num_test: int = 1,
    shape: Sequence[int] = (40, 40, 24),
    pixdim: Sequence[float] = (1.5, 1.5, 2.0),
    seed: int = 0,
) -> Path:
    """Write a small Decathlon task folder (one CT-like modality, labels background/organ); returns it."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    task_dir = Path(root) / task
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task_dir / sub).mkdir(parents=True, exist_ok=True)
    affine = np.diag([*map(float, pixdim), 1.0])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    organ = task.split("_", 1)[-1].lower()

    def volume() -> tuple[np.ndarray, np.ndarray]:
        centre = np.array([rng.uniform(0.35, 0.65) * s for s in shape])
        radii = np.array([rng.uniform(0.15, 0.25) * s for s in shape])
        label = (((grid - centre) / radii) ** 2).sum(-1) <= 1.0
        image = rng.normal(-200.0, 150.0, shape).astype(np.float32)
        image[label] = rng.normal(120.0, 20.0, int(label.sum()))
        return image, label.astype(np.uint8)

    training = []
    for i in range(1, num_training + 1):
        image, label = volume()
        name = f"{organ}_{i}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), task_dir / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), task_dir / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    tests = []
    for i in range(num_training + 1, num_training + num_test + 1):
        image, _ = volume()
        name = f"{organ}_{i}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), task_dir / "imagesTs" / name)
        tests.append(f"./imagesTs/{name}")
    meta = {
        "name": task.split("_", 1)[-1],
        "description": f"{organ} segmentation (fabricated in the Decathlon layout)",
        "reference": "lightning_memcomp recipes.fabricate",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": organ},
        "numTraining": num_training,
        "numTest": num_test,
        "training": training,
        "test": tests,
    }
    (task_dir / "dataset.json").write_text(json.dumps(meta, indent=2))
    return task_dir
