"""Band-limiting with the default FFT grid against the baseline: bytes held after the forward and step time (CPU).

Run with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed buffers leave the process::

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/bandlimit_defaults.py --network resnet18 --fft-size minimal
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/bandlimit_defaults.py --network unet3d --fft-size minimal

Each method runs in its own process (``--method``); without ``--method`` the script runs both and prints a table:
the estimate (:func:`~lightning_memcomp.bandlimit.estimate_band_limit`), RSS growth across the forward (held for
backward; median of ``--steps`` forward passes after one warm-up step), and the step time (forward+backward, median
of ``--steps``, both models interleaved in one process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings

import torch


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _network(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10), torch.randn(8, 3, 64, 64)
    if name == "unet3d":
        from monai.networks.nets import UNet

        net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                   num_res_units=2)
        return net, torch.randn(2, 1, 64, 64, 64)
    raise SystemExit(f"--network={name!r}: use resnet18 or unet3d")


def _one(args: argparse.Namespace) -> dict:
    from lightning_memcomp.bandlimit import band_limit
    from lightning_memcomp.bandlimit.convert import estimate_band_limit

    torch.manual_seed(0)
    model, x = _network(args.network)
    out: dict = {"method": args.method}
    if args.method == "bandlimit":
        est = estimate_band_limit(model, x[:1], compress_rate=args.rate, fft_size=args.fft_size)
        out["estimate_held_mib_per_sample"] = est.held_bytes / 2**20
        out["estimate_conv_mib_per_sample"] = est.conv_bytes / 2**20
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            band_limit(model, compress_rate=args.rate, fft_size=args.fft_size, on_larger="ignore")
    model.train()
    times, held = [], []
    for step in range(args.steps + 1):
        model.zero_grad(set_to_none=True)
        before = _rss()
        t0 = time.perf_counter()
        y = model(x)
        after = _rss()
        y.float().square().mean().backward()
        dt = time.perf_counter() - t0
        if step:  # the first step is a warm-up (allocator, FFT plans)
            times.append(dt)
            held.append(after - before)
        del y
    out["held_mib"] = statistics.median(held) / 2**20
    out["step_s"] = statistics.median(times)
    return out


def _timing(args: argparse.Namespace) -> dict:
    """Step time of both, interleaved in one process (the same machine state for each)."""
    import copy

    from lightning_memcomp.bandlimit import band_limit

    torch.manual_seed(0)
    base, x = _network(args.network)
    banded = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        band_limit(banded, compress_rate=args.rate, fft_size=args.fft_size, on_larger="ignore")
    times: dict[str, list[float]] = {"baseline": [], "bandlimit": []}
    for step in range(args.steps + 1):
        for name, model in (("baseline", base), ("bandlimit", banded)):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            model(x).float().square().mean().backward()
            if step:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network", default="resnet18")
    p.add_argument("--method", choices=["baseline", "bandlimit", "timing"])
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--fft-size", default="minimal")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", help="append the lines, with the command and the machine, to this markdown file")
    args = p.parse_args()
    if args.method:
        print(json.dumps(_timing(args) if args.method == "timing" else _one(args)))
        return
    rows = []
    for method in ("baseline", "bandlimit", "timing"):
        cmd = [sys.executable, __file__, "--network", args.network, "--method", method, "--rate", str(args.rate),
               "--fft-size", args.fft_size, "--steps", str(args.steps)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    base, timing = rows[0], rows.pop()
    lines = []
    for r in rows:
        r["step_s"] = timing[r["method"]]
        lines.append(f"{args.network} {r['method']:<9} fft_size={args.fft_size:<8} held {r['held_mib']:9.1f} MiB "
              f"({r['held_mib'] / base['held_mib']:.2f}x)  step {r['step_s']:7.3f} s "
              f"({r['step_s'] / base['step_s']:.2f}x)"
              + (f"  estimate: spectra {r['estimate_held_mib_per_sample']:.1f} MiB/sample vs conv inputs "
                 f"{r['estimate_conv_mib_per_sample']:.1f} MiB/sample" if "estimate_held_mib_per_sample" in r else ""))
    print("\n".join(lines))
    if args.out:
        from lightning_memcomp.bench.machine import machine_summary

        command = " ".join(["MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/bandlimit_defaults.py", *sys.argv[1:]])
        with open(args.out, "a") as f:
            f.write(f"\n`{command}`\n\nMachine: {machine_summary(load=True)}.\n\n```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
