"""``memcomp bench``: what each technique saves and costs, next to the alternatives, on your own machine.

Runs a matrix of methods on one network and input size and measures, for each method in a fresh
process (so that no allocation of one row leaks into the next):

* **held for backward**: bytes autograd keeps for backward after the forward pass, from the
  saved-tensor ledger (:func:`lightning_memcomp.track_saved_tensors`; a compressing method's own
  engine reports its stored bytes);
* **after forward**: memory growth across the forward pass: ``torch.cuda.memory_allocated()`` on
  CUDA, process RSS on CPU (the workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that large
  buffers are returned to the system when freed);
* **step peak**: ``torch.cuda.max_memory_allocated()`` with the peak reset at the start of the step
  on CUDA; on CPU the peak resident set (``VmHWM``, reset per step through
  ``/proc/self/clear_refs``) above the process's resident set before the model was built;
* **step time**: median of ``--steps`` training steps (forward, backward, SGD step) after
  ``--warmup`` steps. With ``--timing interleaved`` (default) every worker also builds the baseline
  and alternates baseline and method steps, so the time ratio compares steps taken side by side;
* **trainable parameters**, and with ``--accuracy-epochs E`` the accuracy after E epochs on the
  recipe's data (scikit-learn digits for classifiers, MONAI's synthetic volumes for segmenters).

The table on the terminal gives ratios to the baseline; CSV, markdown and a PNG plot (memory saved
against time added) go to ``--out``. Methods (``--list-methods`` prints them)::

    baseline       fp32, nothing changed
    bf16           torch.autocast(dtype=torch.bfloat16)             (alternative)
    checkpoint     torch.utils.checkpoint over every block           (alternative)
    quant:B        k-bit activation quantization, B in 1, 2, 4, 8    (compress_activations)
    blpa:B         BLPA (Chakrabarti & Moseley 2019), B bits
    wavelet:L      Haar wavelet, keep 1/L of the coefficients       (Vu et al. 2024)
    dct:L          16x16 block DCT, keep 1/L
    threshold:L    top-k of the activation itself, keep 1/L
    bandlimit:R    band-limited FFT convolutions, R % of the spectrum discarded (Dziedzic et al. 2019)
    csg / bcsg     convolutional slice generator, trained / binary (Omidvar et al. 2021)

Example::

    memcomp bench --network resnet18_cifar --steps 5 --out bench-results
    memcomp bench --network unet3d --methods baseline,checkpoint,quant:4 --steps 3 --warmup 1
    python -m lightning_memcomp.bench --network tiny_cnn --methods baseline,quant:4 --steps 3

The package, one concern a module: :mod:`.methods` (the method specs), :mod:`.config` (the settings),
:mod:`.networks` (networks by name, the random batch), :mod:`.checkpointing` (the checkpointing
alternative), :mod:`.prepare` (a method applied to a network), :mod:`.probes` (memory readings),
:mod:`.fidelity` (codec round trips, gradient agreement), :mod:`.timing` (timed and interleaved steps),
:mod:`.process` (fresh processes and their result line), :mod:`.worker` (one method in one process),
:mod:`.accuracy` (accuracy on the recipe data), :mod:`.runner` (every method, the ratios), :mod:`.results`
(a row), :mod:`.report` (tables, markdown, CSV), :mod:`.plot`, :mod:`.machine` (the machine's header) and
:mod:`.cli`. The scripts in ``benchmarks/`` measure through the same modules.
"""

from __future__ import annotations

from lightning_memcomp.bench.checkpointing import Checkpointed, checkpoint_blocks
from lightning_memcomp.bench.cli import build_parser, config_from_args, main
from lightning_memcomp.bench.config import DEVICES, TIMINGS, BenchConfig
from lightning_memcomp.bench.machine import machine_info, machine_summary
from lightning_memcomp.bench.methods import (
    ALLOWED_BITS,
    CODEC_OF,
    METHOD_KINDS,
    Method,
    default_methods,
    parse_method,
    parse_methods,
)
from lightning_memcomp.bench.networks import NetworkSpec, TinyCNN, random_batch, resolve_network
from lightning_memcomp.bench.plot import plot
from lightning_memcomp.bench.process import MMAP_THRESHOLD, RESULT_MARKER
from lightning_memcomp.bench.report import (
    COLUMNS,
    MiB,
    format_markdown,
    format_table,
    read_csv,
    write_csv,
    write_outputs,
)
from lightning_memcomp.bench.results import MethodResult
from lightning_memcomp.bench.runner import add_ratios, run_benchmark
from lightning_memcomp.bench.worker import config_argv, run_worker, spawn

# the names of the single module this package was
_config_argv = config_argv
_spawn = spawn

__all__ = [
    "ALLOWED_BITS",
    "CODEC_OF",
    "COLUMNS",
    "DEVICES",
    "METHOD_KINDS",
    "MMAP_THRESHOLD",
    "RESULT_MARKER",
    "TIMINGS",
    "BenchConfig",
    "Checkpointed",
    "Method",
    "MethodResult",
    "MiB",
    "NetworkSpec",
    "TinyCNN",
    "add_ratios",
    "build_parser",
    "checkpoint_blocks",
    "config_argv",
    "config_from_args",
    "default_methods",
    "format_markdown",
    "format_table",
    "machine_info",
    "machine_summary",
    "main",
    "parse_method",
    "parse_methods",
    "plot",
    "random_batch",
    "read_csv",
    "resolve_network",
    "run_benchmark",
    "run_worker",
    "spawn",
    "write_csv",
    "write_outputs",
]
