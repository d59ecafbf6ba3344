"""How good is ``plan_batch_size``? Prediction vs measurement of the step peak, and the planned batch under a cap.

For one network and each method:

1. plan from probe steps at ``--probes`` (e.g. 4,8), with a budget large enough not to cut the probing;
2. measure the step peak at ``--check-factor`` times the larger probe batch (8x by default) with the same
   probe machinery, and report the prediction's error;
3. measure the step peak at ``--budget-batch`` B, plan again with that peak as the budget (default headroom),
   run the planned batch and report its peak against the budget and the planned batch over B.

Writes a markdown table (``--out``) with the machine, the command and the time each plan took.

    python benchmarks/plan_accuracy.py --network resnet18_cifar --probes 4,8 --budget-batch 32 \\
        --out benchmarks/results/plan_resnet18_cifar_cpu.md
    python benchmarks/plan_accuracy.py --network unet3d --input-size 64 --probes 2,4 --budget-batch 8 \\
        --out benchmarks/results/plan_unet3d_cpu.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from lightning_memcomp.bench.config import BenchConfig
from lightning_memcomp.bench.machine import machine_info
from lightning_memcomp.bench.networks import random_batch, resolve_network
from lightning_memcomp.plan import MiB, _freed_memory_returned, _Prober, plan_batch_size
from lightning_memcomp.techniques import parse_technique


def measure(model, technique: str, make_batch, batch: int, device: torch.device, steps: int = 2) -> float:
    """Step peak (MiB) at ``batch`` with the planner's own reading (a fresh copy of the model, one warm-up)."""
    with _freed_memory_returned(device.type == "cpu"):
        prober = _Prober(model, parse_technique(technique), device, BenchConfig(network="custom"), None)
        data = make_batch(batch)
        prober.step(data)
        peak = max(prober.measured_step(data)[0] for _ in range(steps))
    del prober, data
    return peak / MiB


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", default="resnet18_cifar")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--methods", default="baseline,checkpoint,quant:4,dct:10")
    p.add_argument("--probes", default=None, help="probe batches (default: plan_batch_size's choice)")
    p.add_argument("--check-factor", type=int, default=8)
    p.add_argument("--budget-batch", type=int, default=None, help="B (default: 4x the larger probe batch)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    probes = tuple(int(b) for b in args.probes.split(",")) if args.probes else None
    spec = resolve_network(BenchConfig(network=args.network, input_size=args.input_size, batch_size=2))
    torch.manual_seed(0)
    model = spec.build()

    def make_batch(b: int):
        return random_batch(spec, device, 0, b)

    methods = [m.strip() for m in args.methods.split(",")]
    t0 = time.perf_counter()
    plan = plan_batch_size(model, make_batch, methods, budget="1TiB", probe_batches=probes, device=device)
    plan_s = time.perf_counter() - t0
    print(plan, flush=True)
    probes = plan.rows[0].probe_batches
    check = args.check_factor * probes[-1]
    args.budget_batch = args.budget_batch or 4 * probes[-1]
    rows = []
    for method in methods:
        row = plan.row(method)
        predicted = row.predicted_peak_mib(check)
        measured = measure(model, method, make_batch, check, device)
        peak_b = measure(model, method, make_batch, args.budget_batch, device)
        capped = plan_batch_size(model, make_batch, [method], budget=int(peak_b * MiB), probe_batches=probes,
                                 device=device)
        planned = capped.max_batch(method)
        planned_peak = measure(model, method, make_batch, planned, device) if planned else float("nan")
        rows.append((method, row, predicted, measured, peak_b, planned, planned_peak))
        print(f"{method}: predicted {predicted:.1f} MiB at {check}, measured {measured:.1f} "
              f"({100 * (predicted - measured) / measured:+.1f}%); budget {peak_b:.1f} MiB (batch "
              f"{args.budget_batch}) -> planned {planned}, peak {planned_peak:.1f}", flush=True)

    info = machine_info(device)
    lines = [f"# plan_batch_size accuracy: {args.network}"
             f"{f' at {args.input_size}' if args.input_size else ''}, {device.type.upper()}", "",
             f"Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, GPU {info['gpu']}; torch {info['torch']}; "
             f"{torch.get_num_threads()} threads; load {info['load']}; {info['date']}.", "",
             f"Planning {len(methods)} methods (probes at batch {', '.join(map(str, probes))}, "
             f"{len(probes) * 3} steps each) took {plan_s:.1f} s.", "",
             "Step peak: " + plan.reading + ".", "",
             f"| method | fixed MiB | per sample MiB | predicted peak at {check} MiB | measured MiB | error | "
             f"budget = peak at {args.budget_batch} MiB | planned batch | planned / {args.budget_batch} | "
             "peak of the planned batch MiB | within budget |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, row, predicted, measured, peak_b, planned, planned_peak in rows:
        lines.append(
            f"| {method} | {row.fixed_mib:.1f} | {row.per_sample_mib:.2f} | {predicted:.1f} | {measured:.1f} | "
            f"{100 * (predicted - measured) / measured:+.1f}% | {peak_b:.1f} | {planned} | "
            f"{(planned or 0) / args.budget_batch:.2f} | {planned_peak:.1f} | "
            f"{'yes' if planned_peak <= peak_b else 'NO'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
