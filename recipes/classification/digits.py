"""scikit-learn's handwritten digits (8x8, bundled with scikit-learn: no download), resized to 32x32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def load_digits_32(size: int = 32, channels: int = 1, seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """Deterministic 70/10/20 train/val/test split of the 1,797 digits, normalized, ``[N, C, size, size]``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.4  # about zero mean, unit variance for the digits
    if channels != 1:
        x = x.expand(-1, channels, -1, -1).contiguous()
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train, n_val = int(0.7 * len(x)), int(0.1 * len(x))
    return {
        "train": (x[:n_train], y[:n_train]),
        "val": (x[n_train : n_train + n_val], y[n_train : n_train + n_val]),
        "test": (x[n_train + n_val :], y[n_train + n_val :]),
    }
