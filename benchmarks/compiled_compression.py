"""Activation compression of a ``torch.compile``'d network against the compiled baseline, in one process.

One network, compiled once (``torch.compile(model)``, default inductor settings); the methods share its
weights and run interleaved, step by step, so time and memory ratios compare like with like:

* ``baseline``: the compiled network, no hooks;
* ``identity``: the graph hooks with the identity codec (gradients must be bit-identical to the baseline);
* ``quant:B`` / ``blpa:B``: ``compress_activations(compiled, codec, bits=B)``.

Per method: held for backward (RSS growth across the forward, ``MALLOC_MMAP_THRESHOLD_=65536`` so freed
blocks go back to the OS; the script re-executes itself with it), the step peak above the step's start (the
process's peak resident set ``VmHWM``, reset through ``/proc/self/clear_refs``), the step peak per sample
(its slope between ``--batch`` and ``--peak-batch``) and the batch multiplier (the baseline's per-sample peak
over the method's, as ``memcomp bench`` reports it), the median step time, the parameter-gradient cosine to
the baseline, and the compiled graphs Dynamo built over the whole run.

    python benchmarks/compiled_compression.py --network resnet18_cifar --batch 64 --peak-batch 128 \\
        --out benchmarks/results/compiled_resnet18_cifar_cpu.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lightning_memcomp import compress_activations
from lightning_memcomp.bench.machine import machine_info, machine_summary
from lightning_memcomp.memory.readings import peak_rss, process_rss, reset_peak_rss

MiB = 2**20


def build(network: str) -> nn.Module:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from recipes.classification.networks import build_network

    return build_network(network, 10, 3)


def grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()


def step(model, run, engine, x, y) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    start = process_rss()
    reset_peak_rss()
    t0 = time.perf_counter()
    if engine is None:
        out = run(x)
    else:
        with engine:
            out = run(x)
    loss = nn.functional.cross_entropy(out, y)
    held = process_rss() - start
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"held": held, "peak": (peak_rss() or 0) - start, "time": seconds}


def main() -> int:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network", default="resnet18_cifar")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--peak-batch", type=int, default=128)
    p.add_argument("--methods", default="identity,quant:4,blpa:4,quant:8")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    # one frame compiled for every method at two batch sizes: beyond Dynamo's default limit of 8 it would fall
    # back to eager code for the last ones
    torch._dynamo.config.recompile_limit = 64
    torch.manual_seed(args.seed)
    model = build(args.network).train()
    run = torch.compile(model)
    engines: dict[str, object] = {"baseline": None}
    for spec in args.methods.split(","):
        codec, _, bits = spec.partition(":")
        engines[spec] = compress_activations(run, codec, **({"bits": int(bits)} if bits else {}))
    gen = torch.Generator().manual_seed(args.seed)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(n, 3, args.input_size, args.input_size, generator=gen),
                torch.randint(0, 10, (n,), generator=gen))

    x, y = batch(args.batch)
    compile_s: dict[str, float] = {}
    for name, engine in engines.items():  # the first call compiles (the hooks are part of the graph)
        t0 = time.perf_counter()
        step(model, run, engine, x, y)
        compile_s[name] = time.perf_counter() - t0
        step(model, run, engine, x, y)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    gradients: dict[str, torch.Tensor] = {}
    for _ in range(args.steps):
        for name, engine in engines.items():
            rows[name].append(step(model, run, engine, x, y))
            gradients[name] = grads(model)
    ledgers = {name: str(engine.ledger) if engine is not None else "" for name, engine in engines.items()}
    x2, y2 = batch(args.peak_batch)
    big: dict[str, float] = {}
    for name, engine in engines.items():
        step(model, run, engine, x2, y2)
        big[name] = min(step(model, run, engine, x2, y2)["peak"] for _ in range(2))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[name])

    base = {k: med("baseline", k) for k in ("held", "peak", "time")}
    slope_base = (big["baseline"] - base["peak"]) / (args.peak_batch - args.batch)
    ref = gradients["baseline"]
    lines = [
        f"# {args.network} {args.input_size}x{args.input_size}, torch.compile, CPU: activation compression in the "
        "compiled graphs",
        "",
        f"Machine: {machine_summary(machine_info(torch.device('cpu')), load=True)}",
        "",
        "Command: `" + shlex.join(["python", "benchmarks/compiled_compression.py", *sys.argv[1:]]) + "`",
        "",
        f"Batch {args.batch} (per-sample peak: slope to batch {args.peak_batch}); medians of {args.steps} interleaved "
        f"steps; Dynamo compiled {graphs} graphs over the run (every method and both batch sizes).",
        "",
        "Held for backward: RSS growth across the forward (MALLOC_MMAP_THRESHOLD_=65536). Step peak: the process's "
        "peak resident set (VmHWM, reset per step) above the step's start. Batch multiplier: the baseline's step "
        "peak per sample over the method's. Grad cosine: all parameter gradients against the baseline's, same "
        "weights and batch. Ledger: the engine's compiled plan (bytes each compiled graph saves, raw and stored).",
        "",
        "| method | held for backward MiB | held ratio | step peak MiB | step peak / sample MiB | batch multiplier "
        "| step s | time ratio | grad cosine | first step s (compile) | ledger (compiled plan, batch "
        f"{args.batch}) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, engine in engines.items():
        held, peak, seconds = med(name, "held"), med(name, "peak"), med(name, "time")
        slope = (big[name] - peak) / (args.peak_batch - args.batch)
        g = gradients[name]
        cosine = float(g @ ref / (g.norm() * ref.norm()))
        same = " (bit-identical)" if torch.equal(g, ref) and name != "baseline" else ""
        ledger = ledgers[name]
        lines.append(
            f"| {name} | {held / MiB:.1f} | {base['held'] / max(held, 1):.2f}x | {peak / MiB:.1f} | {slope / MiB:.2f} "
            f"| {slope_base / slope:.2f}x | {seconds:.3f} | {seconds / base['time']:.2f}x | {cosine:.5f}{same} "
            f"| {compile_s[name]:.1f} | {ledger} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
