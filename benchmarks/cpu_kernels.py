"""CPU encode/decode of the ``quant`` and ``blpa`` codecs: torch path vs C++ kernel vs ``torch.compile``.

For a float32 activation of ``--mib`` MiB (default 64, shape [N, 64, 32, 32]) and 2/4/8 bits (stochastic
rounding at 2 and 4, the codec's default), per implementation:

* ``torch``: the reference path (``MEMCOMP_KERNELS=torch``): chunks of 4 MiB through ``_quantize_chunk`` /
  ``_dequantize_chunk``;
* ``cpp``: the C++ kernel ``cuda/codecs_cpu.cpp`` (``MEMCOMP_KERNELS=cpp``);
* ``compile``: the torch path with ``_quantize_chunk`` / ``_dequantize_chunk`` replaced by their
  ``torch.compile`` (default mode, inductor on CPU); graph breaks are counted with ``torch._dynamo.explain``;

throughput = activation bytes / best of ``--repeat`` wall times (GB/s, 1e9 bytes), in this process (default
malloc) and in a second one with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed buffers go back to the OS, so every
temporary shows in RSS, and costs its page faults), where the peak RSS growth above the RSS before the call
is measured (``VmHWM`` reset by ``/proc/self/clear_refs``; encode growth includes the payload, decode growth
the output tensor). Run ``python benchmarks/cpu_kernels.py``; it prints a markdown report and writes it to
``benchmarks/results/kernels_cpu.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from lightning_memcomp import kernels
from lightning_memcomp.compression import quant
from lightning_memcomp.compression.blpa import BLPACodec
from lightning_memcomp.compression.quant import QuantCodec
from lightning_memcomp.memory.engine import SaveContext
from lightning_memcomp.memory.readings import peak_rss, process_rss, reset_peak_rss

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "kernels_cpu.md"
MiB = 1 << 20
CTX = SaveContext("conv", nn.Conv2d(1, 1, 1))


@contextlib.contextmanager
def implementation(name: str, compiled: dict[str, Callable]) -> Iterator[None]:
    """``torch`` / ``cpp`` select the backend; ``compile`` is the torch path with compiled chunk functions."""
    kernels.set_backend("cpp" if name == "cpp" else "torch")
    saved = quant._quantize_chunk, quant._dequantize_chunk
    if name == "compile":
        quant._quantize_chunk, quant._dequantize_chunk = compiled["encode"], compiled["decode"]
    try:
        yield
    finally:
        quant._quantize_chunk, quant._dequantize_chunk = saved
        kernels.set_backend(None)


def measure(fn: Callable[[], object], repeat: int) -> tuple[float, float, object]:
    """(best seconds, largest peak RSS growth in bytes, last result) over ``repeat`` calls."""
    best, growth, result = float("inf"), 0.0, None
    for _ in range(repeat):
        result = None
        gc.collect()
        reset_peak_rss()
        before = process_rss()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
        growth = max(growth, (peak_rss() or 0) - before)
    return best, growth, result


def graph_breaks(x: torch.Tensor) -> str:
    chunk = x.reshape(-1, 256)[:64]
    explained = torch._dynamo.explain(quant._quantize_chunk)(chunk, 4, True, torch.Generator().manual_seed(0))
    payload = quant._quantize_chunk(chunk, 4, False)
    decoded = torch._dynamo.explain(quant._dequantize_chunk)(*payload[:4], 4, torch.float32)
    reasons = sorted({str(getattr(b, "reason", b)).splitlines()[0][:90] for b in explained.break_reasons})
    return (f"encode: {explained.graph_count} graphs, {explained.graph_break_count} breaks "
            f"({'; '.join(reasons) or 'none'}); decode: {decoded.graph_count} graphs, "
            f"{decoded.graph_break_count} breaks")


def run(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Rows of measurements (one per codec and implementation) and notes, in this process."""
    torch.manual_seed(0)
    numel = args.mib * MiB // 4
    x = torch.randn(numel // (64 * 32 * 32), 64, 32, 32).requires_grad_()
    nbytes = x.numel() * 4
    kernels.load_extension("codecs_cpu")  # built (or loaded from the cache) before any timing
    impls = ["torch", "cpp"] + ([] if args.no_compile else ["compile"])
    compiled: dict[str, Callable] = {}
    notes = []
    if not args.no_compile:
        torch._dynamo.config.cache_size_limit = 64
        compiled = {"encode": torch.compile(quant._quantize_chunk), "decode": torch.compile(quant._dequantize_chunk)}
        notes.append(f"torch.compile graph breaks (`torch._dynamo.explain`, 4-bit stochastic chunk): {graph_breaks(x)}")
    rows = []
    codecs: list[tuple[str, object]] = [(f"quant:{b}", QuantCodec(bits=b)) for b in args.bits]
    codecs += [(f"blpa:{b}", BLPACodec(bits=b)) for b in args.bits]
    for label, codec in codecs:
        for impl in impls:
            if impl == "compile" and label.startswith("blpa"):
                continue
            with implementation(impl, compiled):
                start = time.perf_counter()
                codec.decode(codec.encode(x, CTX))  # warm-up (and compilation)
                warm = time.perf_counter() - start
                enc_s, enc_growth, payload = measure(lambda: codec.encode(x, CTX), args.repeat)
                dec_s, dec_growth, _ = measure(lambda: codec.decode(payload), args.repeat)
            rows.append({"codec": label, "impl": impl, "encode": nbytes / enc_s / 1e9, "decode": nbytes / dec_s / 1e9,
                         "encode_growth": enc_growth / MiB, "decode_growth": dec_growth / MiB,
                         "stored": codec.stored_nbytes(payload) / MiB, "warm": warm})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows, notes


def report(args: argparse.Namespace, rows: list[dict], mmapped: list[dict], notes: list[str]) -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    command = "python benchmarks/cpu_kernels.py" + "".join(f" {a}" for a in sys.argv[1:])
    lines = [
        "# quant / blpa CPU kernels: encode and decode throughput and peak memory",
        "",
        f"- machine: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}, Python {platform.python_version()}; {now}; load average at the end {load}",
        f"- command: `{command}`",
        f"- input: float32 [N, 64, 32, 32], {args.mib} MiB, contiguous; best of {args.repeat} calls after one "
        "warm-up; GB/s = activation bytes (1e9) per second",
        "- GB/s: this process, default malloc; mmap GB/s: a second process with `MALLOC_MMAP_THRESHOLD_=65536` "
        "(every buffer over 64 KiB mmapped and returned when freed, as `memcomp bench` runs its workers), where "
        "the growth columns are measured: peak RSS above the RSS before the call (encode: with the payload; "
        "decode: with the output tensor)",
        "",
        "| codec | path | encode GB/s | decode GB/s | encode mmap GB/s | decode mmap GB/s | encode growth MiB "
        "| payload MiB | decode growth MiB | warm-up s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, mem in zip(rows, mmapped):
        lines.append(f"| {row['codec']} | {row['impl']} | {row['encode']:.2f} | {row['decode']:.2f} | "
                     f"{mem['encode']:.2f} | {mem['decode']:.2f} | {mem['encode_growth']:.1f} | {row['stored']:.1f} | "
                     f"{mem['decode_growth']:.1f} | {row['warm']:.1f} |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64, help="activation size in MiB (float32)")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-write", action="store_true", help=f"print only (default: also write {OUT})")
    parser.add_argument("--rows-json", action="store_true", help="internal: print the rows as one JSON line")
    args = parser.parse_args(argv)
    if args.rows_json:
        rows, notes = run(args)
        print(json.dumps({"rows": rows, "notes": notes}))
        return 0
    child = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-write"] + ["--rows-json"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, __file__, *child], env=env, stdout=subprocess.PIPE, text=True, check=True)
    mmapped = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    rows, notes = run(args)
    text = report(args, rows, mmapped, notes)
    print(text)
    if not args.no_write:
        OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
