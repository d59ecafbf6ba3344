"""Does a saved-tensor engine left open across many training steps leak? (CPU)

    python benchmarks/engine_leak.py [--steps 200] [--codecs track,quant:4] [--batch 32]
                                     [--network resnet18|tiny] [--threads 2] [--out PATH]

For each codec (``track``: ``track_saved_tensors``, identity codec; ``NAME[:BITS]``:
``compress_activations(model, NAME, bits=BITS)``) and for each allocator setting (glibc defaults, and
``MALLOC_MMAP_THRESHOLD_=65536`` so that large freed buffers leave the resident set), a fresh subprocess
trains the network for ``--steps`` SGD steps (fixed random batch, cross-entropy, momentum 0.9) inside
ONE open engine (``with engine:`` around the whole loop). After every step it records, after
``gc.collect()``: the live ``torch.Tensor`` objects in ``gc.get_objects()``, the engine's per-storage
cache (``len(engine._regions)``, and the regions in it) and the process RSS, read with
``lightning_memcomp.bench.probes`` (``live_tensors``, ``rss``) in ``bench.process.run_fresh`` workers.

A row passes when the live tensors and both cache figures at the last step are no larger than at step 10,
and the RSS grows by less than 5 MiB from step 10 to the last step. Writes a markdown table to ``--out``
and exits non-zero if any row fails.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

from lightning_memcomp.bench.machine import machine_summary
from lightning_memcomp.bench.networks import TinyCNN
from lightning_memcomp.bench.probes import live_tensors, rss
from lightning_memcomp.bench.process import MMAP_THRESHOLD, WorkerFailed, emit, run_fresh
from lightning_memcomp.bench.report import MiB, markdown_table
from lightning_memcomp.bench.timing import train_step

WARM = 10  # the step the last one is compared with
RSS_LIMIT_MIB = 5.0
COUNTS = ("tensors", "cache_keys", "regions")  # must not grow after step WARM


def build_network(name: str) -> torch.nn.Module:
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10)
    if name == "tiny":
        return TinyCNN(in_channels=3, num_classes=10)
    raise ValueError(f"--network={name!r} is not known; allowed: resnet18, tiny")


def build_engine(spec: str, model: torch.nn.Module):
    if spec == "track":
        from lightning_memcomp import track_saved_tensors

        return track_saved_tensors(model)
    from lightning_memcomp.compression import compress_activations

    name, _, bits = spec.partition(":")
    return compress_activations(model, name, bits=int(bits) if bits else None)


def measure(engine) -> dict[str, float]:
    return {
        "tensors": live_tensors(),  # after gc.collect()
        "cache_keys": len(engine._regions),
        "regions": sum(len(r) for r in engine._regions.values()),
        "rss_mib": rss() / MiB,
    }


def worker(args: argparse.Namespace) -> None:
    """One codec in this process: train inside one open engine, print the per-step records as JSON."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_network(args.network).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    engine = build_engine(args.worker, model)

    records = []
    with engine:
        for _ in range(args.steps):
            train_step(model, x, y, opt)
            records.append(measure(engine))
    emit(records)


def run_worker(args: argparse.Namespace, codec: str, mmap: bool) -> list[dict[str, float]]:
    cmd = [__file__, "--worker", codec, "--network", args.network, "--steps", str(args.steps),
           "--batch", str(args.batch), "--threads", str(args.threads)]
    try:
        return run_fresh(cmd, mmap_threshold=MMAP_THRESHOLD if mmap else None)
    except WorkerFailed as err:
        sys.exit(f"worker {codec} (mmap={mmap}) failed:\n{err.stderr}")


def row(codec: str, mmap: bool, records: list[dict[str, float]]) -> tuple[list[str], bool]:
    warm, last = records[WARM - 1], records[-1]
    growth = last["rss_mib"] - warm["rss_mib"]
    ok = all(last[k] <= warm[k] for k in COUNTS) and growth < RSS_LIMIT_MIB
    peak = max(r["rss_mib"] for r in records[WARM - 1:])
    cells = [codec, MMAP_THRESHOLD if mmap else "unset", *(f"{warm[k]} / {last[k]}" for k in COUNTS),
             f"{records[0]['rss_mib']:.1f}", f"{warm['rss_mib']:.1f}", f"{last['rss_mib']:.1f}", f"{peak:.1f}",
             f"{growth:+.2f}", "PASS" if ok else "FAIL"]
    return cells, ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--codecs", default="track,quant:4", help="comma-separated: track, or NAME[:BITS] (quant:4)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--network", default="resnet18", choices=["resnet18", "tiny"],
                   help="torchvision resnet18(num_classes=10) at 32x32, or a small conv net for a quick run")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each worker")
    p.add_argument("--out", default="benchmarks/results/engine_leak_cpu.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < WARM:
        p.error(f"--steps must be at least {WARM}")
    if args.worker:
        worker(args)
        return 0
    command = shlex.join(["python", os.path.relpath(__file__), *sys.argv[1:]])
    rows = []
    failed = False
    for codec in args.codecs.split(","):
        for mmap in (False, True):
            setting = MMAP_THRESHOLD if mmap else "unset"
            print(f"running {codec}, MALLOC_MMAP_THRESHOLD_={setting} ...", file=sys.stderr, flush=True)
            cells, ok = row(codec, mmap, run_worker(args, codec, mmap))
            failed |= not ok
            rows.append(cells)
    table = markdown_table(["codec", "MALLOC_MMAP_THRESHOLD_", "live tensors (10 / last)", "cache keys (10 / last)",
                            "regions (10 / last)", "RSS step 1 (MiB)", "RSS step 10", "RSS last", "RSS max 10..last",
                            "RSS growth 10..last", "result"], rows, "llrrrrrrrrl")
    report = "\n".join([
        "# Saved-tensor engine left open across training steps (CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine_summary()}; {args.threads} torch threads per worker.",
        "",
        f"Network {args.network}, batch {args.batch}x3x32x32, {args.steps} SGD steps inside one open engine, each "
        "codec in a fresh process. Figures after each step (after `gc.collect()`). PASS: live tensors and the "
        f"engine cache at the last step <= at step {WARM}, and RSS growth from step {WARM} to the last "
        f"< {RSS_LIMIT_MIB:g} MiB.",
        "",
        table,
        "",
    ])
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
