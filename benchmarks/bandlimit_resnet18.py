"""Band-limited convolutions on the CIFAR-style ResNet-18: memory held for backward and step time (CPU).

Configurations: ordinary ``nn.Conv2d``; band-limited (Dziedzic et al., ICML 2019) at compress_rate
0/25/50/75 with the paper's power-of-two FFT size (compress_rate 0 is the full-spectrum FFT network);
optionally the same with ``fft_size="minimal"``. Every 3x3 conv (stem included) is converted, 1x1
shortcuts are left alone, as in the paper.

* held for backward: ledger bytes (``track_saved_tensors``) over one forward pass, and process RSS growth
  across the forward pass (``MALLOC_MMAP_THRESHOLD_=65536``, ``gc.collect()`` before each reading), each
  configuration in a fresh subprocess;
* step time (forward + backward + SGD step): all configurations in one process, interleaved, after one
  warm-up step each; the median of ``--steps`` timed steps.

Ratios are given against ``nn.Conv2d`` and against the full-spectrum FFT network (compress_rate 0).

    python benchmarks/bandlimit_resnet18.py [--batch 128] [--steps 2] [--fft-sizes power2 minimal]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lightning_memcomp import track_saved_tensors  # noqa: E402
from lightning_memcomp.bandlimit import band_limit  # noqa: E402
from recipes.classification.networks_cifar import resnet18_cifar  # noqa: E402

MiB = 1024 * 1024


def build(config: str) -> nn.Module:
    torch.manual_seed(0)
    model = resnet18_cifar(num_classes=10, in_channels=3)
    if config != "conv":
        fft_size, rate = config.split(":")
        band_limit(model, compress_rate=float(rate), fft_size=fft_size)
    return model


def rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(config: str, batch: int) -> dict:
    """Run in a fresh process: ledger bytes and RSS growth across one forward pass."""
    torch.manual_seed(0)
    model = build(config).train()
    x = torch.randn(batch, 3, 32, 32)
    before = rss()
    with track_saved_tensors(model) as ledger:
        out = model(x)
    after = rss()
    conv_saved = sum(
        m.raw_bytes for name, m in ledger.by_module().items()
        if isinstance(model.get_submodule(name), nn.Module) and "conv" in name
    )
    del out
    return {"ledger": ledger.raw_bytes, "ledger_convs": conv_saved, "rss": after - before}


def time_steps(configs: list[str], batch: int, steps: int) -> dict[str, float]:
    models = {c: build(c).train() for c in configs}
    opts = {c: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for c, m in models.items()}
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    times: dict[str, list[float]] = {c: [] for c in configs}
    for rep in range(steps + 1):
        for c in configs:
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(models[c](x), y)
            opts[c].zero_grad(set_to_none=True)
            loss.backward()
            opts[c].step()
            elapsed = time.perf_counter() - start
            if rep:  # the first round is the warm-up
                times[c].append(elapsed)
            print(f"  step {rep} {c}: {elapsed:.2f} s", file=sys.stderr, flush=True)
    return {c: statistics.median(t) for c, t in times.items()}


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
        print(json.dumps(measure_memory(args.memory_only, args.batch)))
        return

    configs = ["conv"] + [f"{f}:{r:g}" for f in args.fft_sizes for r in args.rates]
    memory = {}
    for c in configs:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(
            [sys.executable, __file__, "--memory-only", c, "--batch", str(args.batch)],
            check=True, capture_output=True, text=True, env=env,
        )
        memory[c] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"memory {c}: {memory[c]}", file=sys.stderr, flush=True)
    speed = time_steps(configs, args.batch, args.steps)

    probe = build("power2:0")
    realized = {}
    for r in args.rates:
        model = build(f"power2:{r:g}")
        for name, m in model.named_modules():
            if hasattr(m, "compression_for") and name == "layer1.0.conv1":
                realized[r] = m.compression_for((32, 32))
    del probe

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    lines = [
        "# Band-limited convolutions: CIFAR ResNet-18, CPU",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, load average at the end "
        f"{' / '.join(f'{v:.1f}' for v in os.getloadavg())} (1/5/15 min; step-time ratios are taken in one process, "
        f"interleaved); torch {torch.__version__}; {platform.python_implementation()} "
        f"{platform.python_version()}; {datetime.date.today().isoformat()}. No GPU was lent to this task: no GPU row.",
        "",
        f"`python benchmarks/bandlimit_resnet18.py --batch {args.batch} --steps {args.steps} --fft-sizes "
        f"{' '.join(args.fft_sizes)}`; batch {args.batch}, 32x32 inputs, every 3x3 conv band-limited (17 layers), "
        "1x1 shortcuts left as nn.Conv2d. Step = forward + backward + SGD step, median of "
        f"{args.steps} timed steps after one warm-up.",
        "",
        "| network | realized compression (32x32 layer) | held for backward, ledger MiB | x nn.Conv2d | x FFT full | "
        "saved by convs MiB | RSS growth MiB | x nn.Conv2d | step s | x nn.Conv2d | x FFT full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
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

        def ratio(a: float, b: float | None) -> str:
            return f"{a / b:.2f}" if b else "-"

        lines.append(
            f"| {label} | {comp} | {mem['ledger'] / MiB:.1f} | {ratio(mem['ledger'], memory['conv']['ledger'])} | "
            f"{ratio(mem['ledger'], ref_fft['ledger'] if ref_fft else None)} | {mem['ledger_convs'] / MiB:.1f} | "
            f"{mem['rss'] / MiB:.1f} | {ratio(mem['rss'], memory['conv']['rss'])} | {t:.2f} | "
            f"{ratio(t, speed['conv'])} | {ratio(t, speed.get(base_fft) if base_fft else None)} |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
