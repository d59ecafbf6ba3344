"""Default ``compress_activations(model)`` on networks written elsewhere: torchvision's EfficientNet-B0,
MobileNetV3-Large, ConvNeXt-Tiny and RegNetY-400MF (random weights, 224x224, batch 8, CPU).

Run ``python benchmarks/zoo_coverage.py`` (about 10 minutes on 2 cores); it writes
``benchmarks/results/zoo_coverage_cpu.md``. For each network and codec (defaults: ``quant``, ``blpa``,
``wavelet``, ``dct``, ``threshold``), in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536``:

* **held after the forward**: RSS growth across the forward (``probes.forward_memory``), for the network
  without any hook (baseline) and inside the default engine; the ratio is baseline over method;
* **parameter-gradient cosine** of one cross-entropy step to the same step without any hook (same weights, same
  input and labels, same stochastic-depth and dropout draws);
* the ledger: raw and stored bytes, and what was **left as it is**, by reason.

A codec that refuses a network is reported with its message.

``--speed NETWORK`` instead times training steps (forward + backward, interleaved in one process) of the network
without hooks, with ``quant`` 4 bits and the policy off, and with the defaults (the policy's function mode and
derivative codes), and appends the ratios to ``--out``.
"""

from __future__ import annotations

import argparse
import traceback
from pathlib import Path

import torch

from lightning_memcomp.bench.fidelity import gradient_agreement
from lightning_memcomp.bench.machine import machine_summary
from lightning_memcomp.bench.probes import forward_memory
from lightning_memcomp.bench.process import emit, run_fresh
from lightning_memcomp.bench.report import format_mib, markdown_table

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = ["efficientnet_b0", "mobilenet_v3_large", "convnext_tiny", "regnet_y_400mf", "resnet18"]
CODECS = ["quant", "blpa", "wavelet", "dct", "threshold"]
MiB = 1024 * 1024


def build(network: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, network)(weights=None, num_classes=1000).train()


def grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, context) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same stochastic-depth and dropout draws in every run
    if context is None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
    else:
        with context:
            loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()


def measure(network: str, codec: str, batch: int, size: int) -> dict:
    from lightning_memcomp import compress_activations

    model = build(network)
    torch.manual_seed(2)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    warmup = torch.randn(2, 3, size, size)
    if codec == "baseline":
        mem = forward_memory(model, x, None, warmup=warmup)
        return {"held": mem.growth}
    try:
        engine = compress_activations(model, codec)
    except (ValueError, TypeError) as err:
        return {"refused": str(err)}
    mem = forward_memory(model, x, lambda: engine, warmup=warmup)
    ledger = mem.ledger
    reference = grads(model, x, y, None)
    cosine, _ = gradient_agreement(grads(model, x, y, engine), reference)
    return {
        "held": mem.growth,
        "cosine": cosine,
        "raw": ledger.raw_bytes,
        "stored": ledger.stored_bytes,
        "left": ledger.passthrough_bytes,
        "reasons": dict(getattr(ledger, "left_as_is", lambda: {})()),
        "codecs": {name: m.raw_bytes for name, m in ledger.by_codec().items()},
        "policy": repr(getattr(engine, "policy", None)),
    }


def speed(network: str, batch: int, size: int, rounds: int) -> str:
    from lightning_memcomp import compress_activations
    from lightning_memcomp.bench.report import format_ratio
    from lightning_memcomp.bench.timing import interleaved, median, train_step

    model = build(network)
    torch.manual_seed(2)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    engines = {"no hooks": None, "quant 4, policy off": compress_activations(model, "quant", policy="off"),
               "quant 4, default policy": compress_activations(model, "quant")}

    def step(engine):
        return lambda: train_step(model, x, y, context=None if engine is None else lambda: engine)

    times = interleaved({k: step(e) for k, e in engines.items()}, rounds, warmup=1)
    base = median(times["no hooks"])
    rows = [[k, f"{median(t):.3f}", format_ratio(median(t) / base)] for k, t in times.items()]
    return (f"\nTraining step of {network}, batch {batch}, {size}x{size}, median of {rounds} interleaved rounds "
            f"(`python benchmarks/zoo_coverage.py --speed {network}`; {machine_summary(load=True)}):\n\n"
            + markdown_table(["configuration", "step s", "ratio to no hooks"], rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs=2, metavar=("NETWORK", "CODEC"), help=argparse.SUPPRESS)
    parser.add_argument("--networks", nargs="+", default=NETWORKS)
    parser.add_argument("--codecs", nargs="+", default=CODECS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed", metavar="NETWORK", help="time training steps of NETWORK instead (appended to --out)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zoo_coverage_cpu.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.speed:
        text = speed(args.speed, args.batch, args.size, args.rounds)
        with open(args.out, "a") as f:
            f.write(text)
        print(text)
        return
    if args.measure:
        try:
            emit(measure(*args.measure, args.batch, args.size))
        except Exception:  # noqa: BLE001 - reported in the table
            emit({"error": traceback.format_exc(limit=3)[-600:]})
        return
    rows = []
    for network in args.networks:
        common = ["--batch", str(args.batch), "--size", str(args.size), "--threads", str(args.threads)]
        base = run_fresh([__file__, "--measure", network, "baseline", *common])
        rows.append([network, "no hooks", format_mib(base["held"]), "1.00x", "1", "-", "-", "-", "-"])
        for codec in args.codecs:
            r = run_fresh([__file__, "--measure", network, codec, *common])
            if "refused" in r or "error" in r:
                rows.append([network, codec, "-", "-", "-", "-", "-", "-", (r.get("refused") or r["error"])[:300]])
                print(rows[-1], flush=True)
                continue
            reasons = ", ".join(f"{k} {v / MiB:.1f}" for k, v in sorted(r["reasons"].items()) if v)
            stored_by = ", ".join(f"{k} {v / MiB:.0f}" for k, v in sorted(r["codecs"].items(), key=lambda kv: -kv[1])
                                  if v >= MiB)
            rows.append([network, codec, format_mib(r["held"]), f"{base['held'] / max(r['held'], 1):.2f}x",
                         f"{r['cosine']:.4f}", f"{r['raw'] / max(r['stored'], 1):.2f}x",
                         stored_by, f"{r['left'] / MiB:.1f} ({r['left'] / max(r['raw'], 1):.1%})", reasons])
            print(rows[-1], flush=True)
    table = markdown_table(["network", "codec", "held after forward MiB (RSS)", "held ratio", "grad cosine",
                            "ledger raw/stored", "raw MiB by the codec that stored it", "left as is MiB (of raw)",
                            "left as is by reason (MiB)"], rows)
    text = (
        "# Default `compress_activations(model)` on torchvision networks (CPU)\n\n"
        f"Machine: {machine_summary(load=True)}.\n\nCommand: `python benchmarks/zoo_coverage.py` (batch {args.batch}, "
        f"{args.size}x{args.size}, random weights, train mode, {args.threads} threads). Held: RSS growth across the "
        "forward in a fresh process with MALLOC_MMAP_THRESHOLD_=65536, after a warm-up step; ratio = no-hooks "
        "baseline / method. Cosine: parameter gradients of one cross-entropy step against the same step with no "
        "hooks. The transform codecs keep their payload only where its relative error is at most 0.1 (the precision "
        "policy) and store the rest with 4-bit quant: the column 'raw MiB by the codec that stored it' shows where "
        "each went; `derivative` is the smooth activations' derivative codes.\n\n" + table + "\n"
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
