"""Shared fixtures: GPU marker handling, the digits data and a tiny plain-torch training loop."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per xdist worker: the workers already fill the cores
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_intra_op_thread():
    """Run single-threaded: on a shared 2-core machine, intra-op threads thrash (5-10x slower steps on
    small tensors); use with ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn digits at 32x32, 1 channel: {"train"|"val"|"test": (x, y)}."""
    from recipes.classification.digits import load_digits_32

    return load_digits_32()


class SmallCNN(nn.Module):
    """A small digits CNN with 3x3 convs (band-limitable, CSG-convertible) and a 1x1 conv."""

    def __init__(self, in_channels: int = 1, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.mix = nn.Conv2d(2 * width, 2 * width, 1)
        self.relu = nn.ReLU()
        self.head_pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.stem(x)))
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = self.relu(self.mix(x))
        return self.head(torch.flatten(self.head_pool(x), 1))


@pytest.fixture
def small_cnn() -> Callable[..., nn.Module]:
    return SmallCNN


@pytest.fixture
def train_digits(digits) -> Callable[..., float]:
    """``train_digits(model, epochs=3, seed=0, context=None, lr=1e-3) -> test accuracy``.

    ``context`` is a zero-argument callable returning a context manager entered around each training
    forward pass (e.g. ``lambda: compress_activations(model, bits=4)``).
    """

    def run(model: nn.Module, epochs: int = 3, seed: int = 0, context=None, lr: float = 2e-3,
            batch_size: int = 64) -> float:
        torch.manual_seed(seed)
        x, y = digits["train"]
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            model.train()
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                with context() if context else contextlib.nullcontext():
                    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        xt, yt = digits["test"]
        with torch.no_grad():
            return (model(xt).argmax(1) == yt).float().mean().item()

    return run


def run_ddp_script(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a DDP script in a fresh interpreter (``subprocess.run`` with its output captured as text), once more
    if Lightning's free port was taken by another DDP test starting at the same moment (CI runs two test files
    at once; Lightning picks the port, then binds it later): that race is the only failure tried again."""
    # an in-process DDP test that ran earlier in this pytest worker left MASTER_PORT (and its store, still bound to
    # that port) in this process's environment: a child must pick its own
    env = {k: v for k, v in kwargs.pop("env", os.environ).items()
           if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    for _ in range(3):
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False, env=env, **kwargs)
        if "EADDRINUSE" not in done.stderr:
            break
    return done
