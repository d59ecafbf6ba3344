"""Accuracy on the recipe data: a fresh model with the method, trained for a few epochs, scored on held-out data."""

from __future__ import annotations

import torch
from torch import nn

from lightning_memcomp.bench.config import BenchConfig
from lightning_memcomp.bench.methods import Method
from lightning_memcomp.bench.networks import NetworkSpec
from lightning_memcomp.bench.prepare import PreparedModel

__all__ = ["measure_accuracy"]


def measure_accuracy(cfg: BenchConfig, spec: NetworkSpec, method: Method, device: torch.device) -> tuple[float, str]:
    """Train a fresh model with the method for ``cfg.accuracy_epochs`` epochs (Adam, lr 2e-3); test score.

    Classification: top-1 accuracy (%) on scikit-learn's digits (1,257 train / 360 test images, resized to
    the input size, repeated to the input channels). Segmentation: mean foreground Dice (%) on MONAI's
    synthetic circles/spheres (32 train / 8 test images of the input size).
    """
    torch.manual_seed(cfg.seed)
    prep = PreparedModel(method, spec, cfg, device, ledger=False)
    opt = torch.optim.Adam([p for p in prep.model.parameters() if p.requires_grad], lr=2e-3)
    gen = torch.Generator().manual_seed(cfg.seed)
    if spec.task == "classification":
        from recipes.classification.digits import load_digits_32

        if spec.num_classes != 10:
            raise ValueError(f"--accuracy-epochs on the digits needs --num-classes=10, got {spec.num_classes}")
        data = load_digits_32(size=spec.input_size, channels=spec.in_channels, seed=cfg.seed)
        (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    else:
        from recipes.segmentation.data import SyntheticSegmentationDataModule

        rad_max = max(1, min(16, spec.input_size // 2 - 1))
        dm = SyntheticSegmentationDataModule(spatial_dims=spec.spatial_dims, image_size=spec.input_size,
                                             num_train=32, num_val=1, num_test=8, rad_min=min(5, rad_max),
                                             rad_max=rad_max, num_classes=spec.num_classes, seed=cfg.seed)
        dm.setup()
        train, test = dm._splits["train"], dm._splits["test"]
        x_train, y_train = train.images, train.labels[:, 0]
        x_test, y_test = test.images, test.labels[:, 0]
    for _ in range(cfg.accuracy_epochs):
        prep.model.train()
        for idx in torch.randperm(len(x_train), generator=gen).split(spec.batch_size):
            with prep.forward_context(False):
                loss = nn.functional.cross_entropy(prep.model(x_train[idx].to(device)), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    prep.model.eval()
    preds = []
    with torch.no_grad():
        for start in range(0, len(x_test), spec.batch_size):
            preds.append(prep.model(x_test[start:start + spec.batch_size].to(device)).argmax(1).cpu())
    pred = torch.cat(preds)
    if spec.task == "classification":
        return 100.0 * (pred == y_test).float().mean().item(), "top-1 % (digits)"
    dices = []
    for c in range(1, spec.num_classes):
        p, g = pred == c, y_test == c
        denom = p.sum() + g.sum()
        dices.append(1.0 if denom == 0 else (2.0 * (p & g).sum() / denom).item())
    return 100.0 * sum(dices) / len(dices), "Dice % (synthetic)"
