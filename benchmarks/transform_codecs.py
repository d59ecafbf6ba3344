"""Transform-domain activation compression (Vu et al., TMLR 2024): quality, memory and speed on CPU.

Run ``python benchmarks/transform_codecs.py`` (about 10 minutes on 2 busy cores); it prints the tables and
writes ``benchmarks/results/transform_codecs_cpu.md``. Sections:

1. Relative reconstruction error ``||X - decode(encode(X))|| / ||X||`` of each codec over
   ``lambda`` in 1000, 100, 10, 2.5, 1.4, 1.1, 1 on smooth images (digits upsampled to 64x64).
2. CIFAR-style ResNet-18 (3x3 stem, no max-pool), batch 128 at 32x32, convolutions, batch norms and
   ReLUs compressed with DCT: memory held for backward by the ledger and by RSS growth across the
   forward pass (a fresh subprocess per configuration, ``MALLOC_MMAP_THRESHOLD_=65536``), and
   ``eta = (M - M_BL) / (M_BL - M_O)`` (Vu et al. Eq. 34).
3. MONAI 3-D UNet (1 -> 2 channels, channels 16/32/64/128, strides 2/2/2) on 2x1x64x64x64 with the Haar
   wavelet at ``lambda = 10``: stored over raw, and every decode checked for exact shape and dtype.
4. Speed: a training step (forward + backward) of each codec over the uncompressed step, interleaved in
   one process.
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
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_memcomp.compression import compress_activations, make_codec  # noqa: E402
from lightning_memcomp.memory.engine import SaveContext  # noqa: E402
from lightning_memcomp.memory.ledger import MiB  # noqa: E402

LAMBDAS = [1000, 100, 10, 2.5, 1.4, 1.1, 1]
CODECS = {
    "threshold": ("threshold", {}),
    "dct (16x16)": ("dct", {"block": 16}),
    "wavelet haar": ("wavelet", {"wavelet": "haar"}),
    "wavelet db3": ("wavelet", {"wavelet": "db3"}),
}
RESNET_MODULES = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]


# -- 1. reconstruction ----------------------------------------------------------------------------------
def reconstruction(dtype: torch.dtype) -> tuple[str, dict[str, list[float]]]:
    from recipes.classification.digits import load_digits_32

    x = load_digits_32(size=64)["test"][0][:16].to(dtype)  # 16 digits, 1 channel, 64x64
    ctx = SaveContext("bench", None)
    rows = []
    errors: dict[str, list[float]] = {}
    for label, (name, options) in CODECS.items():
        errs, ratios = [], []
        for ratio in LAMBDAS:
            codec = make_codec(name, compression_ratio=ratio, **options)
            payload = codec.encode(x, ctx)
            rec = codec.decode(payload)
            errs.append(((rec.double() - x.double()).norm() / x.double().norm()).item())
            ratios.append(codec.stored_nbytes(payload) / (x.numel() * x.element_size()))
        errors[label] = errs
        floor = 1e-12 if dtype == torch.float64 else 1e-6
        monotone = all(a >= b - floor for a, b in zip(errs, errs[1:]))
        strict = all(a >= b for a, b in zip(errs, errs[1:]))
        rows.append(
            f"| {label} | " + " | ".join(f"{e:.2e} ({r:.2f}x)" for e, r in zip(errs, ratios))
            + f" | {'yes' if strict else 'yes, to round-off' if monotone else 'NO'} | {errs[-1] == 0.0} |"
        )
    head = (
        f"Relative reconstruction error (stored / raw bytes) on 16 digits upsampled to 64x64, {dtype}:\n\n"
        "| codec | " + " | ".join(f"lambda {r:g}" for r in LAMBDAS) + " | non-increasing | 0 at 1 |\n"
        "|---|" + "---:|" * len(LAMBDAS) + "---|---|"
    )
    at10 = {k: v[LAMBDAS.index(10)] for k, v in errors.items()}
    verdict = ", ".join(
        f"{k}: {at10[k]:.3g} ({'beats' if at10[k] < at10['threshold'] else 'DOES NOT beat'} threshold "
        f"{at10['threshold']:.3g})"
        for k in at10 if k != "threshold"
    )
    return head + "\n" + "\n".join(rows) + f"\n\nAt lambda = 10: {verdict}.\n", errors


# -- 2. ResNet-18 memory (one subprocess per configuration) ---------------------------------------------
def _rss() -> int:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss


def measure_resnet(config: str, batch: int) -> dict:
    """Run in a fresh process: RSS growth and ledger of one forward pass of ResNet-18."""
    from lightning_memcomp.memory.engine import track_saved_tensors
    from recipes.classification.networks_cifar import resnet18_cifar

    torch.manual_seed(0)
    model = resnet18_cifar()
    if config == "baseline":
        def engine():
            return track_saved_tensors(model)
    else:
        ratio = float(config.split("=")[1])

        def engine():
            return compress_activations(model, codec="dct", compression_ratio=ratio, block=16,
                                        modules=RESNET_MODULES)
    # warm up the code paths (thread pools, kernels, cached DCT matrices) on a small batch
    with engine():
        out = model(torch.randn(4, 3, 32, 32))
    out.sum().backward()
    model.zero_grad(set_to_none=False)
    del out
    x = torch.randn(batch, 3, 32, 32)
    rss0 = _rss()
    t0 = time.perf_counter()
    if config == "baseline":
        out = model(x)  # the true baseline: no hooks at all
        forward_s = time.perf_counter() - t0
        rss1 = _rss()
        del out
        with engine() as ledger:  # the ledger of the same forward, for the raw figure
            out = model(x)
    else:
        with engine() as ledger:
            out = model(x)
        forward_s = time.perf_counter() - t0
        rss1 = _rss()
    codec = ledger.by_codec().get("dct")
    return {
        "config": config,
        "rss_growth": rss1 - rss0,
        "raw": ledger.raw_bytes,
        "stored": ledger.stored_bytes,
        "codec_raw": codec.raw_bytes if codec else 0,
        "codec_stored": codec.stored_bytes if codec else 0,
        "forward_s": forward_s,
        "threads": torch.get_num_threads(),
    }


def resnet_memory(batch: int) -> str:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    results = {}
    for config in ("baseline", "dct lambda=100", "dct lambda=10"):
        out = subprocess.run(
            [sys.executable, __file__, "--measure", config, "--batch", str(batch)],
            env=env, capture_output=True, text=True, check=True,
        )
        results[config] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["baseline"]
    lines = [
        f"CIFAR ResNet-18 (`resnet18_cifar`), batch {batch}, 3x32x32, Conv2d + BatchNorm2d + ReLU in all blocks "
        "compressed with DCT (16x16 blocks):\n",
        "| configuration | ledger held MiB | ledger eta | compressed layers stored/raw | RSS growth MiB | RSS eta "
        "| forward s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for config, r in results.items():
        ledger_eta = (r["stored"] - base["raw"]) / base["raw"]
        rss_eta = (r["rss_growth"] - base["rss_growth"]) / base["rss_growth"]
        layers = f"{r['codec_stored'] / r['codec_raw']:.4f}" if r["codec_raw"] else "-"
        lines.append(
            f"| {config} | {r['stored'] / MiB:.1f} | {ledger_eta:+.1%} | {layers} | {r['rss_growth'] / MiB:.1f} "
            f"| {rss_eta:+.1%} | {r['forward_s']:.1f} |"
        )
    lines.append(
        "\neta = (M - M_BL) / (M_BL - M_O). Ledger: M_BL - M_O = the raw bytes autograd saves for backward "
        "(M_O = everything the forward does not hold for backward: parameters, input, runtime), M - M_O = the "
        "bytes stored. RSS: M_O = the process RSS right before the forward (parameters, input, warmed-up "
        "runtime), M - M_O = its growth across the forward, measured in a fresh process per configuration "
        "with MALLOC_MMAP_THRESHOLD_=65536 after gc.collect(). The paper reports -63% for this setting.\n"
    )
    return "\n".join(lines)


# -- 3. MONAI 3-D UNet ------------------------------------------------------------------------------------
def unet3d() -> str:
    from monai.networks.nets import UNet

    from lightning_memcomp.compression.wavelet import WaveletCodec

    checked = {"decodes": 0, "exact": 0}

    class CheckedWavelet(WaveletCodec):
        def encode(self, tensor, ctx):
            return (tuple(tensor.shape), tensor.dtype, super().encode(tensor, ctx))

        def decode(self, payload):
            shape, dtype, inner = payload
            out = super().decode(inner)
            checked["decodes"] += 1
            checked["exact"] += int(tuple(out.shape) == shape and out.dtype == dtype)
            return out

        def stored_nbytes(self, payload):
            return super().stored_nbytes(payload[2])

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128), strides=(2, 2, 2))
    x = torch.randn(2, 1, 64, 64, 64)
    codec = CheckedWavelet(10, wavelet="haar", levels=3)
    with compress_activations(net, codec=codec) as ledger:
        out = net(x)
    out.square().mean().backward()
    wav = ledger.by_codec()["wavelet"]
    return (
        "MONAI UNet (spatial_dims=3, 1 -> 2 channels, channels (16, 32, 64, 128), strides (2, 2, 2)), input "
        "2x1x64x64x64, wavelet haar, 3 levels, lambda = 10, default module selection:\n\n"
        "| figure | value |\n|---|---:|\n"
        f"| raw held for backward (all saved tensors) | {ledger.raw_bytes / MiB:.1f} MiB |\n"
        f"| stored (all saved tensors) | {ledger.stored_bytes / MiB:.1f} MiB |\n"
        f"| stored / raw, all saved tensors | {ledger.stored_bytes / ledger.raw_bytes:.4f} |\n"
        f"| stored / raw, wavelet-compressed tensors ({wav.count}) | {wav.stored_bytes / wav.raw_bytes:.4f} |\n"
        f"| decodes with exact shape and dtype | {checked['exact']} of {checked['decodes']} |\n"
    )


# -- 4. speed ---------------------------------------------------------------------------------------------
def speed(batch: int, rounds: int) -> str:
    import contextlib

    from recipes.classification.networks_cifar import resnet18_cifar

    torch.manual_seed(0)
    model = resnet18_cifar()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    configs = {"baseline": None, **{k: v for k, v in CODECS.items() if k != "wavelet db3"}}

    def step(entry) -> float:
        ctx = contextlib.nullcontext() if entry is None else compress_activations(
            model, codec=entry[0], compression_ratio=10, modules=RESNET_MODULES, **entry[1])
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with ctx:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in configs}
    for entry in configs.values():
        step(entry)  # warm-up
    for _ in range(rounds):
        for label, entry in configs.items():
            times[label].append(step(entry))
    base = statistics.median(times["baseline"])
    lines = [
        f"Training step (forward + backward) of ResNet-18, batch {batch}, lambda = 10, Conv2d + BatchNorm2d + "
        f"ReLU compressed; median of {rounds} interleaved rounds, {torch.get_num_threads()} thread(s):\n",
        "| configuration | step s (median) | ratio to baseline |",
        "|---|---:|---:|",
    ]
    for label, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {label} | {med:.2f} | {med / base:.2f}x |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"Machine: {cpu}, {os.cpu_count()} cores (shared with other jobs: timings are noisy, so speed is a ratio "
        f"to the uncompressed step of the same process), Python {platform.python_version()}, torch "
        f"{torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. No GPU was "
        "lent to this task: every figure is CPU-only.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--speed-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1 avoids thread thrashing on a shared machine)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "transform_codecs_cpu.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure_resnet(args.measure, args.batch)))
        return
    sections = [f"# Transform-domain activation compression on CPU\n\n{machine()}\n"
                f"Command: `python benchmarks/transform_codecs.py` ({args.threads} intra-op thread(s)).\n"]
    for title, run in (
        ("## 1. Reconstruction quality", lambda: reconstruction(torch.float32)[0] + "\n"
         + reconstruction(torch.float64)[0]),
        ("## 2. Memory held for backward: ResNet-18", lambda: resnet_memory(args.batch)),
        ("## 3. MONAI 3-D UNet", unet3d),
        ("## 4. Speed", lambda: speed(args.speed_batch, args.rounds)),
    ):
        t0 = time.perf_counter()
        body = run()
        text = f"{title}\n\n{body}\n(section took {time.perf_counter() - t0:.0f} s)\n"
        print(text, flush=True)
        sections.append(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(sections))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
