"""Time to plan four methods (``plan_batch_size``) next to Lightning's ``BatchSizeFinder`` finding the baseline's
batch under the same cap.

On CUDA the cap is ``torch.cuda.set_per_process_memory_fraction``. On CPU nothing caps PyTorch's memory for
``BatchSizeFinder`` to run into, so the finder's process gets an address-space limit (``RLIMIT_AS``: the
virtual memory it has at the start plus the cap): an allocation beyond it fails with PyTorch's
"DefaultCPUAllocator: can't allocate memory", which ``BatchSizeFinder`` treats as out of memory. Address
space is not resident memory (allocator arenas and thread stacks reserve more than they touch), so the
finder's batch is smaller than the plan's under the same number; the comparison is of time. Each side runs
in a fresh process.

    python benchmarks/plan_vs_finder.py --cap 1GiB --out benchmarks/results/plan_vs_finder_cpu.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

_CHILD = r'''
import json, resource, sys, time, warnings
import torch
warnings.filterwarnings("ignore")
side, cap, network, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
import lightning.pytorch as pl
from torch import nn
from lightning_memcomp.bench.config import BenchConfig
from lightning_memcomp.bench.networks import resolve_network
spec = resolve_network(BenchConfig(network=network, batch_size=2))
torch.manual_seed(0)

class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = spec.build()
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

class Random(torch.utils.data.Dataset):
    def __len__(self):
        return 1 << 20
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(spec.in_channels, *(spec.input_size,) * spec.spatial_dims, generator=g), i % spec.num_classes

class Data(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.batch_size = 16
    def train_dataloader(self):
        return torch.utils.data.DataLoader(Random(), batch_size=self.batch_size)

model, data = Module(), Data()
if side == "plan":
    from lightning_memcomp.plan import batch_maker, plan_batch_size
    t0 = time.perf_counter()
    plan = plan_batch_size(model, batch_maker(data), ["baseline", "checkpoint", "quant:4", "dct:10"], budget=cap)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "batches": {r.method: r.max_batch for r in plan.rows},
                      "table": plan.table()}))
else:
    from lightning.pytorch.callbacks import BatchSizeFinder
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + cap, resource.RLIM_INFINITY))
    finder = BatchSizeFinder(mode="power", init_val=16, max_trials=25, steps_per_trial=3)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, callbacks=[finder], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    orig = finder.scale_batch_size
    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = orig(*args, **kwargs)
        timed.seconds = time.perf_counter() - start
        return out
    finder.scale_batch_size = timed
    trainer.fit(model, data)
    print(json.dumps({"seconds": timed.seconds, "batch": finder.optimal_batch_size}))
'''


def _run(side: str, cap: int, network: str, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, side, str(cap), network, str(threads)], capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    from lightning_memcomp.bench.machine import machine_info
    from lightning_memcomp.plan import parse_budget

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", default="resnet18_cifar")
    p.add_argument("--cap", default="1GiB")
    p.add_argument("--finder-caps", default=None,
                   help="comma-separated address-space caps to run the finder under (default: --cap)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cap = parse_budget(args.cap)
    plan = _run("plan", cap, args.network, args.threads)
    finder_caps = [parse_budget(c) for c in args.finder_caps.split(",")] if args.finder_caps else [cap]
    finders = [(c, _run("finder", c, args.network, args.threads)) for c in finder_caps]
    info = machine_info()
    text = "\n".join([
        f"# plan_batch_size vs BatchSizeFinder: {args.network}, CPU, cap {args.cap}", "",
        f"Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`", "",
        f"Machine: {info['cpu']}, {info['cores']} cores, GPU {info['gpu']}; torch {info['torch']}; {args.threads} "
        f"threads; {info['date']}.", "",
        "| | what it finds | seconds |", "|---|---|---|",
        f"| plan_batch_size, 4 methods | {', '.join(f'{m} {b}' for m, b in plan['batches'].items())} | "
        f"{plan['seconds']:.1f} |",
        *(f"| BatchSizeFinder (power, from 16), baseline only, RLIMIT_AS = start + {c / 2**30:g} GiB | baseline "
          f"{finder['batch']} | {finder['seconds']:.1f} |" for c, finder in finders), "",
        "The plan's budget counts resident memory; the finder's cap counts address space (more than is "
        "resident), so the batches differ; the comparison is of time.", "", "```text", plan["table"], "```", ""])
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
