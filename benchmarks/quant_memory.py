"""Bytes held for backward with the ``quant`` codec: ledger and process RSS, plus gradient fidelity.

Acceptance figures of the low-precision-activation issue, on CPU:

* torchvision ``resnet18(num_classes=10)``, train mode, 32x3x224x224 fp32: held-for-backward ratio to
  uncompressed at 8/4/2 bits, by the ledger and by RSS growth across the forward pass;
* MONAI 3-D ``UNet`` (channels 16..128, strides 2) on a 2x1x64x64x64 volume at 4 bits (and 8/2);
* cosine similarity of the flattened parameter gradients to the uncompressed ones on the resnet18
  batch at 8/4/2 bits, and bit-identical gradients with the identity codec.

Each memory configuration runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` (so large
allocations are returned to the OS when freed and RSS measures what is alive), after one warm-up step.
Run ``python benchmarks/quant_memory.py`` (``--quick`` for small shapes); it prints markdown tables and
writes them to ``benchmarks/results/quant_cpu.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

MiB = 1024 * 1024
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


def _context(model: torch.nn.Module, codec: str, bits: int | None):
    from lightning_memcomp import track_saved_tensors
    from lightning_memcomp.compression import compress_activations

    if codec == "none":
        return track_saved_tensors(model)
    return compress_activations(model, codec=codec, bits=bits)


def child(model_name: str, codec: str, bits: int | None, quick: bool) -> dict:
    """One configuration in this (fresh) process: ledger and RSS growth across the forward pass."""
    import psutil

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, x, y = build(model_name, quick)
    loss_fn = torch.nn.functional.cross_entropy
    # warm-up step: thread pools, allocator arenas, kernel caches
    with _context(model, codec, bits):
        loss = loss_fn(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    del loss
    gc.collect()
    proc = psutil.Process()
    before = proc.memory_info().rss
    with _context(model, codec, bits) as ledger:
        out = model(x)
    gc.collect()
    after = proc.memory_info().rss
    output_bytes = out.numel() * out.element_size()
    loss = loss_fn(out, y)
    loss.backward()
    return {
        "model": model_name,
        "codec": codec,
        "bits": bits,
        "ledger_raw": ledger.raw_bytes,
        "ledger_stored": ledger.stored_bytes,
        "rss_growth": after - before,
        "output_bytes": output_bytes,
    }


def run_child(model_name: str, codec: str, bits: int | None, quick: bool) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--child", model_name, codec, str(bits), *(["--quick"] if quick else [])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gradient_fidelity(quick: bool) -> list[tuple[str, float, bool]]:
    """Cosine of flattened parameter gradients to the uncompressed ones (same batch, same weights)."""
    model, x, y = build("resnet18", quick)

    def grads(ctx) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with ctx:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).double()

    from lightning_memcomp.compression import compress_activations

    base = grads(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    rows = []
    ident = grads(compress_activations(model, codec="identity"))
    rows.append(("identity", float(torch.nn.functional.cosine_similarity(ident, base, dim=0)), bool(torch.equal(ident, base))))
    for bits in (8, 4, 2):
        g = grads(compress_activations(model, codec="quant", bits=bits))
        rows.append((f"quant {bits}-bit", float(torch.nn.functional.cosine_similarity(g, base, dim=0)), bool(torch.equal(g, base))))
    return rows


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; no GPU was lent to this task")


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
        print(json.dumps(child(model_name, codec, None if bits == "None" else int(bits), args.quick)))
        return 0

    lines = [f"# quant codec: held for backward and gradient fidelity (CPU)", "", f"Machine: {machine()}.", "",
             f"Command: `python benchmarks/quant_memory.py{' --quick' if args.quick else ''}`", ""]
    lines += ["| model | codec | ledger raw MiB | ledger stored MiB | ledger ratio | RSS growth MiB | RSS ratio "
              "| RSS growth - output MiB | ratio |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model_name in args.models:
        base = run_child(model_name, "none", None, args.quick)
        rows = [("uncompressed", base)] + [(f"quant {b}-bit", run_child(model_name, "quant", b, args.quick))
                                           for b in (8, 4, 2)]
        base_held = base["rss_growth"] - base["output_bytes"]
        for label, r in rows:
            held = r["rss_growth"] - r["output_bytes"]
            lines.append(
                f"| {model_name} | {label} | {r['ledger_raw'] / MiB:.1f} | {r['ledger_stored'] / MiB:.1f} "
                f"| {base['ledger_raw'] / r['ledger_stored']:.2f}x | {r['rss_growth'] / MiB:.1f} "
                f"| {base['rss_growth'] / max(r['rss_growth'], 1):.2f}x | {held / MiB:.1f} "
                f"| {base_held / max(held, 1):.2f}x |"
            )
            print(lines[-1], flush=True)
    lines += ["", "Ratios are to the uncompressed run of the same model (fresh process each, after a warm-up "
              "step, `MALLOC_MMAP_THRESHOLD_=65536`). RSS growth also holds the model output (alive after any "
              "forward, not saved for backward: the U-Net's 2x2x64^3 fp32 logits are 4 MiB) and autograd's graph "
              "nodes, which no codec removes; the last two columns subtract the output.", ""]
    if not args.skip_gradients:
        lines += ["| resnet18 gradients | cosine to uncompressed | bit-identical |", "|---|---:|---|"]
        for label, cos, same in gradient_fidelity(args.quick):
            lines.append(f"| {label} | {cos:.6f} | {same} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        out = ROOT / "benchmarks" / "results" / "quant_cpu.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
