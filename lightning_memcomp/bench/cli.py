"""``memcomp bench``'s command line: the parser, the configuration it gives, and ``main``."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

from lightning_memcomp.bandlimit.functional import FFT_SIZES as BAND_FFT_SIZES
from lightning_memcomp.bench.config import DEVICES, TIMINGS, BenchConfig
from lightning_memcomp.bench.methods import Method, method_help, parse_floats, parse_method, parse_methods
from lightning_memcomp.bench.networks import resolve_network
from lightning_memcomp.bench.process import RESULT_MARKER
from lightning_memcomp.bench.report import format_table, write_outputs
from lightning_memcomp.bench.results import MethodResult
from lightning_memcomp.bench.runner import run_benchmark
from lightning_memcomp.bench.worker import serve
from lightning_memcomp.short_errors import ShortArgumentParser

__all__ = ["build_parser", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``memcomp bench`` argument parser; every option is documented in ``--help``."""
    p = ShortArgumentParser(
        prog="memcomp bench",
        description="Measure memory held for backward, memory after forward, step peak, step time, trainable "
                    "parameters and (optionally) accuracy of every memory-saving technique against the fp32 "
                    "baseline and the alternatives (bf16 autocast, activation checkpointing). Each method runs "
                    "in a fresh process; results go to the terminal (ratios to the baseline) and to CSV, "
                    "markdown and PNG files in --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=f"Methods: {method_help()}. Example: memcomp bench --network resnet18_cifar --steps 3 --warmup 1",
    )
    p.add_argument("--network", default="resnet18_cifar",
                   help="network by name: a classification network of the recipes (resnet18_cifar, resnet56_cifar, "
                        "densenet_bc, any torchvision classifier), unet2d/unet3d (MONAI UNet 16-32-64-128, two "
                        "residual units), segresnet2d/3d, dynunet2d/3d, or tiny_cnn (seconds per run, for smoke tests)")
    p.add_argument("--methods", default="all",
                   help="comma-separated methods, or 'all' for the full matrix (baseline, bf16, checkpoint, quant:8, "
                        "quant:4, quant:2, blpa:4, wavelet/dct/threshold at each of --lambdas, bandlimit at each of "
                        "--band-rates, csg); the baseline is always run first")
    p.add_argument("--lambdas", default="4,10",
                   help="compression ratios lambda (>= 1) of wavelet, dct and threshold in --methods all")
    p.add_argument("--band-rates", default="50,85",
                   help="compress_rate percentages (0 <= R < 100) of bandlimit in --methods all")
    p.add_argument("--band-fft-size", choices=BAND_FFT_SIZES, default="power2",
                   help="FFT grid of bandlimit: power2 (the paper's, rounded up to a power of two), linear (the "
                        "paper's length) or minimal (the padded input size: exact, and the smallest in memory)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size (default: 128 for classifiers, 2 for 3-D and 8 for 2-D segmenters, 32 for tiny_cnn)")
    p.add_argument("--peak-batch", type=int, default=None,
                   help="a second, larger batch size: measure the step peak at both in one process and report "
                        "the peak per sample (the slope: weights, optimizer state and workspace cancel) and the "
                        "batch multiplier, the baseline's peak per sample over the method's (how many times larger "
                        "a batch fits)")
    p.add_argument("--input-size", type=int, default=None,
                   help="spatial side of the input (default: 32 for classifiers, 64 for 3-D, 128 for 2-D segmenters)")
    p.add_argument("--in-channels", type=int, default=None,
                   help="input channels (default: 3 for classifiers, 1 for segmenters and tiny_cnn)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes (output channels for segmenters; default 10 for classifiers, 2 for segmenters)")
    p.add_argument("--steps", type=int, default=5, help="measured training steps per method (median time)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps before measuring (the last one fills the ledger)")
    p.add_argument("--timing", choices=TIMINGS, default="interleaved",
                   help="interleaved: each worker also times the baseline, alternating baseline and method steps, "
                        "and the time ratio compares the two (robust on a busy machine, about twice the run time); "
                        "isolated: time ratios across processes")
    p.add_argument("--accuracy-epochs", type=int, default=0,
                   help="when > 0, train a fresh model per method for this many epochs on the recipe data (digits "
                        "for classifiers, synthetic volumes for segmenters) and report the test score")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every method's network, the baseline too (quant/blpa run inside the graphs)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to run (auto: CUDA when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the random batch and the data split")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per worker (default: torch's)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate of the measured steps (momentum 0.9)")
    p.add_argument("--csg-slice", default=None,
                   help="CSG slice shape out,in,k,k[,k] (default 16,16,3,3 for 2-D networks, 16,16,3,3,3 for 3-D)")
    p.add_argument("--csg-code-size", type=int, default=128, help="CSG code size")
    p.add_argument("--checkpoint-modules", default=None,
                   help="comma-separated class names or qualified-name globs of the blocks to checkpoint (default: "
                        "classes named *Block or *Bottleneck, and MONAI ResidualUnit)")
    p.add_argument("--jobs", type=int, default=1,
                   help="methods measured at the same time, each in its own process (memory figures stay per "
                        "process; combine with --timing interleaved so that time ratios compare side-by-side steps)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per method before it is marked failed")
    p.add_argument("--out", default="bench-results", help="folder for the CSV, markdown and PNG files")
    p.add_argument("--name", default=None, help="base name of the output files (default: bench_<network>_<device>)")
    p.add_argument("--note", action="append", default=[],
                   help="a line added to the markdown report (e.g. why a method is left out); may be repeated")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list-methods", action="store_true", help="print the methods of --methods all and exit")
    p.add_argument("--worker", metavar="METHOD", default=None,
                   help="internal: measure one method in this process and print its result as one JSON line "
                        f"(prefixed {RESULT_MARKER.strip()}); the benchmark runs this in a fresh process per method")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    slice_shape = None
    if args.csg_slice:
        try:
            slice_shape = tuple(int(s) for s in args.csg_slice.split(","))
        except ValueError:
            raise ValueError(f"--csg-slice={args.csg_slice!r} is not allowed; use integers like 16,16,3,3") from None
    modules = tuple(s.strip() for s in args.checkpoint_modules.split(",") if s.strip()) if args.checkpoint_modules \
        else None
    cfg = BenchConfig(
        network=args.network, batch_size=args.batch_size, input_size=args.input_size, in_channels=args.in_channels,
        num_classes=args.num_classes, steps=args.steps, warmup=args.warmup, timing=args.timing,
        accuracy_epochs=args.accuracy_epochs, device=args.device, seed=args.seed, threads=args.threads, lr=args.lr,
        csg_slice=slice_shape, csg_code_size=args.csg_code_size, checkpoint_modules=modules,
        band_fft_size=args.band_fft_size, timeout=args.timeout, peak_batch=args.peak_batch,
        compile=args.compile,
    )
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> int:
    """``memcomp bench`` (and ``python -m lightning_memcomp.bench``); returns the exit status.

    0 when every method was measured, 1 when some failed or were unavailable (their rows say why),
    2 on bad options.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        cfg = config_from_args(args)
        lambdas = parse_floats("--lambdas", args.lambdas, lambda v: math.isfinite(v) and v >= 1, "numbers >= 1")
        rates = parse_floats("--band-rates", args.band_rates, lambda v: 0 <= v < 100, "percentages in [0, 100)")
        if args.worker is not None:
            method = parse_method(args.worker)
        else:
            methods = parse_methods(args.methods, lambdas, rates)
            resolve_network(cfg)
            cfg.resolved_device()
    except ValueError as err:
        parser.error(str(err))
    if args.worker is not None:
        return serve(cfg, method)
    if args.list_methods:
        for m in methods:
            print(f"{m.name:<14} {m.description}")
        return 0
    command = "memcomp bench " + shlex.join(args_list)
    if args.jobs > 1 and cfg.timing == "isolated":
        args.note.append(f"--jobs {args.jobs} with --timing isolated: methods ran {args.jobs} at a time, so their "
                         "step times (and time ratios) include each other's load")

    def partial(rows: list[MethodResult]) -> None:  # a long run leaves usable files at every stage
        measured = {r.method for r in rows}
        pending = [m.name for m in [Method("baseline"), *methods] if m.name not in measured]
        write_outputs(rows, cfg, Path(args.out), args.name, command, notes=args.note,
                      pending=list(dict.fromkeys(pending)))

    results = run_benchmark(cfg, methods, progress=not args.no_progress, jobs=args.jobs, on_result=partial)
    paths = write_outputs(results, cfg, Path(args.out), args.name, command, notes=args.note)
    print(format_table(results))
    print("\nwritten: " + ", ".join(str(p) for p in paths.values()))
    return 0 if all(r.status == "ok" for r in results) else 1
