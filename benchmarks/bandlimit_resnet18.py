"""Band-limited convolutions on the CIFAR-style ResNet-18: memory held for backward and step time (CPU).

Configurations: ordinary ``nn.Conv2d``; band-limited (Dziedzic et al., ICML 2019) at compress_rate
0/25/50/75 with the paper's power-of-two FFT size (compress_rate 0 is the full-spectrum FFT network);
optionally the same with ``fft_size="minimal"``. Every 3x3 conv (stem included) is converted, 1x1
shortcuts are left alone, as in the paper.

* held for backward: ledger bytes (``track_saved_tensors``) over one forward pass, and process RSS growth
  across the forward pass (``MALLOC_MMAP_THRESHOLD_=65536``, ``gc.collect()`` before each reading), each
  configuration in a fresh subprocess (``lightning_memcomp.bench``: ``probes.forward_memory`` in
  ``process.run_fresh``);
* step time (forward + backward + SGD step): all configurations in one process, interleaved
  (``bench.timing.interleaved`` of ``bench.timing.train_step``), after one warm-up step each; the median of
  ``--steps`` timed steps.

Ratios are given against ``nn.Conv2d`` and against the full-spectrum FFT network (compress_rate 0).

    python benchmarks/bandlimit_resnet18.py [--batch 128] [--steps 2] [--fft-sizes power2 minimal]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

from lightning_memcomp import track_saved_tensors
from lightning_memcomp.bandlimit import band_limit
from lightning_memcomp.bench.machine import machine_summary
from lightning_memcomp.bench.probes import forward_memory
from lightning_memcomp.bench.process import emit, run_fresh
from lightning_memcomp.bench.report import format_mib, format_number, markdown_table
from lightning_memcomp.bench.results import ratio
from lightning_memcomp.bench.timing import interleaved, median, train_step
from recipes.classification.networks_cifar import resnet18_cifar

ROOT = Path(__file__).resolve().parent.parent


def build(config: str) -> nn.Module:
    torch.manual_seed(0)
    model = resnet18_cifar(num_classes=10, in_channels=3)
    if config != "conv":
        fft_size, rate = config.split(":")
        band_limit(model, compress_rate=float(rate), fft_size=fft_size)
    return model


def measure_memory(config: str, batch: int) -> dict:
    """Run in a fresh process: ledger bytes and RSS growth across one forward pass."""
    torch.manual_seed(0)
    model = build(config).train()
    x = torch.randn(batch, 3, 32, 32)
    mem = forward_memory(model, x, lambda: track_saved_tensors(model))
    conv_saved = sum(m.raw_bytes for name, m in mem.ledger.by_module().items() if "conv" in name)
    return {"ledger": mem.ledger.raw_bytes, "ledger_convs": conv_saved, "rss": mem.growth}


def time_steps(configs: list[str], batch: int, steps: int) -> dict[str, float]:
    models = {c: build(c).train() for c in configs}
    opts = {c: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for c, m in models.items()}
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    def step(c: str):
        def run() -> float:
            seconds = train_step(models[c], x, y, opts[c])
            print(f"  step {c}: {seconds:.2f} s", file=sys.stderr, flush=True)
            return seconds
        return run

    times = interleaved({c: step(c) for c in configs}, steps, warmup=1)
    return {c: median(t) for c, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--rates", type=float, nargs="+", default=[0, 25, 50, 75])
    parser.add_argument("--fft-sizes", nargs="+", default=["power2"], choices=["power2", "linear", "minimal"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bandlimit_cpu.md")
    parser.add_argument("--memory-only", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    if args.memory_only:
        emit(measure_memory(args.memory_only, args.batch))
        return

    configs = ["conv"] + [f"{f}:{r:g}" for f in args.fft_sizes for r in args.rates]
    memory = {}
    for c in configs:
        memory[c] = run_fresh([__file__, "--memory-only", c, "--batch", str(args.batch)])
        print(f"memory {c}: {memory[c]}", file=sys.stderr, flush=True)
    speed = time_steps(configs, args.batch, args.steps)

    realized = {}
    for r in args.rates:
        model = build(f"power2:{r:g}")
        for name, m in model.named_modules():
            if hasattr(m, "compression_for") and name == "layer1.0.conv1":
                realized[r] = m.compression_for((32, 32))

    def cell(a: float, b: float | None) -> str:
        return format_number(ratio(a, b), ".2f")

    rows = []
    for c in configs:
        base_fft = f"{c.split(':')[0]}:0" if c != "conv" else None
        mem, t = memory[c], speed[c]
        if c == "conv":
            label, comp = "nn.Conv2d", "-"
        else:
            fft_size, rate = c.split(":")
            label = f"band-limited, compress_rate {rate} ({fft_size})"
            comp = f"{realized.get(float(rate), float('nan')):.3f}" if fft_size == "power2" else "-"
        ref_fft = memory.get(base_fft) if base_fft else None
        rows.append([label, comp, format_mib(mem["ledger"]), cell(mem["ledger"], memory["conv"]["ledger"]),
                     cell(mem["ledger"], ref_fft["ledger"] if ref_fft else None), format_mib(mem["ledger_convs"]),
                     format_mib(mem["rss"]), cell(mem["rss"], memory["conv"]["rss"]), f"{t:.2f}",
                     cell(t, speed["conv"]), cell(t, speed.get(base_fft) if base_fft else None)])
    lines = [
        "# Band-limited convolutions: CIFAR ResNet-18, CPU",
        "",
        f"Machine: {machine_summary(load=True)} (at the end; step-time ratios are taken in one process, "
        "interleaved).",
        "",
        f"`python benchmarks/bandlimit_resnet18.py --batch {args.batch} --steps {args.steps} --fft-sizes "
        f"{' '.join(args.fft_sizes)}`; batch {args.batch}, 32x32 inputs, every 3x3 conv band-limited (17 layers), "
        "1x1 shortcuts left as nn.Conv2d. Step = forward + backward + SGD step, median of "
        f"{args.steps} timed steps after one warm-up.",
        "",
        markdown_table(["network", "realized compression (32x32 layer)", "held for backward, ledger MiB",
                        "x nn.Conv2d", "x FFT full", "saved by convs MiB", "RSS growth MiB", "x nn.Conv2d", "step s",
                        "x nn.Conv2d", "x FFT full"], rows),
    ]
    table = "\n".join(lines)
    print(table)
    args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
