"""Per-step overhead of MemoryMonitor on CPU: step time with it over step time without it.

    python benchmarks/monitor_overhead.py [--steps 20] [--repeats 3] [--batch 64]

Both runs fit the CIFAR-style ResNet-18 (recipes/classification/networks_cifar.py) on random 32x32
data in the same process, interleaved, with the same TensorBoard logger; MemoryMonitor logs every
step (its most expensive setting) and tracks saved tensors itself. Steps are timed by
``lightning_memcomp.bench.callbacks.StepTimer``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_memcomp import MemoryMonitor
from lightning_memcomp.bench.callbacks import StepTimer
from lightning_memcomp.bench.machine import machine_summary
from lightning_memcomp.bench.report import markdown_table
from lightning_memcomp.bench.timing import median
from recipes.classification.networks_cifar import resnet18_cifar


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = resnet18_cifar(num_classes=10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def run(steps: int, batch: int, monitor: bool, root: str) -> list[float]:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(steps * batch, 3, 32, 32), torch.randint(0, 10, (steps * batch,)))
    timer = StepTimer()
    callbacks = [timer] + ([MemoryMonitor(every_n_steps=1)] if monitor else [])
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=TensorBoardLogger(root), callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=batch))
    return timer.times[2:]  # drop warm-up steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    without, with_ = [], []
    with tempfile.TemporaryDirectory() as root:
        for _ in range(args.repeats):
            without += run(args.steps, args.batch, False, root)
            with_ += run(args.steps, args.batch, True, root)
    base, mon = median(without), median(with_)
    print(f"MemoryMonitor overhead, ResNet-18 (CIFAR), batch {args.batch}, {args.steps} steps x {args.repeats}, "
          f"{torch.get_num_threads()} threads; machine: {machine_summary(load=True)}")
    print(markdown_table(["run", "median step (s)", "ratio"], [
        ["without MemoryMonitor", f"{base:.4f}", "1.000"],
        ["with MemoryMonitor(every_n_steps=1)", f"{mon:.4f}", f"{mon / base:.3f}"],
    ]))


if __name__ == "__main__":
    main()
