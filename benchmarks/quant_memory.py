"""Bytes held for backward with the ``quant`` codec: ledger and process RSS, plus gradient fidelity.

Acceptance figures of the low-precision-activation issue, on CPU:

* torchvision ``resnet18(num_classes=10)``, train mode, 32x3x224x224 fp32: held-for-backward ratio to
  uncompressed at 8/4/2 bits, by the ledger and by RSS growth across the forward pass;
* MONAI 3-D ``UNet`` (channels 16..128, strides 2) on a 2x1x64x64x64 volume at 4 bits (and 8/2);
* cosine similarity of the flattened parameter gradients to the uncompressed ones on the resnet18
  batch at 8/4/2 bits, and bit-identical gradients with the identity codec.

Measured with ``lightning_memcomp.bench``: each memory configuration runs in a fresh process
(``bench.process.run_fresh``, ``MALLOC_MMAP_THRESHOLD_=65536``, so large allocations are returned to the OS
when freed and RSS measures what is alive) and is read by ``bench.probes.forward_memory`` after one warm-up
step; the gradients by ``bench.fidelity``. Run ``python benchmarks/quant_memory.py`` (``--quick`` for small
shapes); it prints markdown tables and writes them to ``benchmarks/results/quant_cpu.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lightning_memcomp.bench.fidelity import flat_gradients, gradient_agreement
from lightning_memcomp.bench.machine import machine_summary
from lightning_memcomp.bench.probes import forward_memory
from lightning_memcomp.bench.process import emit, run_fresh
from lightning_memcomp.bench.report import format_mib, format_ratio, markdown_row, markdown_table

ROOT = Path(__file__).resolve().parent.parent


def build(model_name: str, quick: bool) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if model_name == "resnet18":
        import torchvision

        model = torchvision.models.resnet18(num_classes=10)
        x = torch.randn(4 if quick else 32, 3, 224, 224)
        y = torch.randint(0, 10, (x.shape[0],))
    elif model_name == "unet3d":
        from monai.networks.nets import UNet

        model = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128), strides=(2, 2, 2))
        side = 32 if quick else 64
        x = torch.randn(2, 1, side, side, side)
        y = torch.randint(0, 2, (2, side, side, side))
    else:
        raise ValueError(f"model={model_name!r} is not one of resnet18, unet3d")
    return model.train(), x, y


def _engine(model: torch.nn.Module, codec: str, bits: int | None):
    from lightning_memcomp import track_saved_tensors
    from lightning_memcomp.compression import compress_activations

    if codec == "none":
        return track_saved_tensors(model)
    return compress_activations(model, codec=codec, bits=bits)


def child(model_name: str, codec: str, bits: int | None, quick: bool) -> dict:
    """One configuration in this (fresh) process: ledger and RSS growth across the forward pass."""
    model, x, _ = build(model_name, quick)
    mem = forward_memory(model, x, lambda: _engine(model, codec, bits), warmup=x)
    return {"model": model_name, "codec": codec, "bits": bits, "ledger_raw": mem.ledger.raw_bytes,
            "ledger_stored": mem.ledger.stored_bytes, "rss_growth": mem.growth, "output_bytes": mem.output_bytes}


def run_child(model_name: str, codec: str, bits: int | None, quick: bool) -> dict:
    return run_fresh([__file__, "--child", model_name, codec, str(bits), *(["--quick"] if quick else [])])


def gradient_fidelity(quick: bool) -> list[tuple[str, float, bool]]:
    """Cosine of flattened parameter gradients to the uncompressed ones (same batch, same weights)."""
    from lightning_memcomp.compression import compress_activations

    model, x, y = build("resnet18", quick)
    base = flat_gradients(model, x, y)
    contexts = [("identity", compress_activations(model, codec="identity"))]
    contexts += [(f"quant {bits}-bit", compress_activations(model, codec="quant", bits=bits)) for bits in (8, 4, 2)]
    return [(label, *gradient_agreement(flat_gradients(model, x, y, ctx), base)) for label, ctx in contexts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "CODEC", "BITS"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write the results file")
    parser.add_argument("--skip-gradients", action="store_true", help="memory tables only")
    parser.add_argument("--models", nargs="+", default=["resnet18", "unet3d"], choices=["resnet18", "unet3d"])
    args = parser.parse_args(argv)
    if args.child:
        model_name, codec, bits = args.child
        emit(child(model_name, codec, None if bits == "None" else int(bits), args.quick))
        return 0

    lines = ["# quant codec: held for backward and gradient fidelity (CPU)", "", f"Machine: {machine_summary()}.", "",
             f"Command: `python benchmarks/quant_memory.py{' --quick' if args.quick else ''}`", ""]
    rows = []
    for model_name in args.models:
        base = run_child(model_name, "none", None, args.quick)
        runs = [("uncompressed", base)] + [(f"quant {b}-bit", run_child(model_name, "quant", b, args.quick))
                                           for b in (8, 4, 2)]
        base_held = base["rss_growth"] - base["output_bytes"]
        for label, r in runs:
            held = r["rss_growth"] - r["output_bytes"]
            rows.append([model_name, label, format_mib(r["ledger_raw"]), format_mib(r["ledger_stored"]),
                         format_ratio(base["ledger_raw"] / r["ledger_stored"]), format_mib(r["rss_growth"]),
                         format_ratio(base["rss_growth"] / max(r["rss_growth"], 1)), format_mib(held),
                         format_ratio(base_held / max(held, 1))])
            print(markdown_row(rows[-1]), flush=True)
    lines += [markdown_table(["model", "codec", "ledger raw MiB", "ledger stored MiB", "ledger ratio", "RSS growth MiB",
                              "RSS ratio", "RSS growth - output MiB", "ratio"], rows, "llrrrrrrr")]
    lines += ["", "Ratios are to the uncompressed run of the same model (fresh process each, after a warm-up "
              "step, `MALLOC_MMAP_THRESHOLD_=65536`). RSS growth also holds the model output (alive after any "
              "forward, not saved for backward: the U-Net's 2x2x64^3 fp32 logits are 4 MiB) and autograd's graph "
              "nodes, which no codec removes; the last two columns subtract the output.", ""]
    if not args.skip_gradients:
        grads = [[label, f"{cos:.6f}", str(same)] for label, cos, same in gradient_fidelity(args.quick)]
        lines += [markdown_table(["resnet18 gradients", "cosine to uncompressed", "bit-identical"], grads, "lrl")]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        out = ROOT / "benchmarks" / "results" / "quant_cpu.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
