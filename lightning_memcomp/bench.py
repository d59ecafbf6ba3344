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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_memcomp.bandlimit.functional import FFT_SIZES as BAND_FFT_SIZES
from lightning_memcomp.memory.readings import peak_rss, reset_peak_rss

__all__ = [
    "METHOD_KINDS",
    "BenchConfig",
    "Checkpointed",
    "Method",
    "MethodResult",
    "NetworkSpec",
    "build_parser",
    "checkpoint_blocks",
    "default_methods",
    "machine_info",
    "main",
    "parse_method",
    "parse_methods",
    "resolve_network",
    "run_benchmark",
    "run_worker",
]

MiB = 1024 * 1024
RESULT_MARKER = "MEMCOMP_BENCH_RESULT "
MMAP_THRESHOLD = "65536"
TIMINGS = ("interleaved", "isolated")
DEVICES = ("auto", "cpu", "cuda")

# ---------------------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------------------

#: kind -> (what its value means or None, description template, family)
METHOD_KINDS: dict[str, tuple[str | None, str, str]] = {
    "baseline": (None, "fp32, nothing changed", "baseline"),
    "bf16": (None, "bf16 autocast (torch.autocast)", "alternative"),
    "checkpoint": (None, "activation checkpointing over each block (torch.utils.checkpoint)", "alternative"),
    "quant": ("bits", "{v}-bit activation quantization", "activation compression"),
    "blpa": ("bits", "BLPA {v}-bit (Chakrabarti & Moseley 2019)", "activation compression"),
    "wavelet": ("lambda", "Haar wavelet top-k, lambda={v} (Vu et al. 2024)", "activation compression"),
    "dct": ("lambda", "block DCT top-k, lambda={v} (Vu et al. 2024)", "activation compression"),
    "threshold": ("lambda", "top-k thresholding, lambda={v} (Vu et al. 2024)", "activation compression"),
    "bandlimit": ("rate", "band-limited FFT conv, compress_rate={v}% (Dziedzic et al. 2019)", "band-limit"),
    "csg": (None, "conv slice generator (Omidvar et al. 2021)", "slice generator"),
    "bcsg": (None, "binary conv slice generator (Omidvar et al. 2021)", "slice generator"),
}
ALLOWED_BITS = (1, 2, 4, 8)
CODEC_OF = {"quant": "quant", "blpa": "blpa", "wavelet": "wavelet", "dct": "dct", "threshold": "threshold"}


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: a technique kind and its setting (``quant:4``, ``bandlimit:50``)."""

    kind: str
    value: float | None = None

    @property
    def name(self) -> str:
        if self.value is None:
            return self.kind
        v = int(self.value) if float(self.value).is_integer() else self.value
        return f"{self.kind}:{v}"

    @property
    def family(self) -> str:
        return METHOD_KINDS[self.kind][2]

    @property
    def description(self) -> str:
        v = None if self.value is None else (int(self.value) if float(self.value).is_integer() else self.value)
        return METHOD_KINDS[self.kind][1].format(v=v)


def _method_help() -> str:
    return (
        "baseline, bf16, checkpoint, quant:B, blpa:B (B in 1, 2, 4, 8), wavelet:L, dct:L, threshold:L "
        "(L = compression ratio lambda >= 1), bandlimit:R (R = percent of the spectrum discarded, 0 <= R < 100), "
        "csg, bcsg"
    )


def parse_method(spec: str) -> Method:
    """Parse ``"quant:4"``, ``"bandlimit:50"``, ``"checkpoint"``, ... into a :class:`Method`.

    Raises:
        ValueError: unknown kind, missing or unexpected value, or a value outside what the kind allows.
    """
    text = spec.strip()
    kind, sep, raw = text.partition(":")
    kind = kind.strip().lower()
    if kind not in METHOD_KINDS:
        raise ValueError(f"method {spec!r} is not known; allowed: {_method_help()}")
    meaning = METHOD_KINDS[kind][0]
    if meaning is None:
        if sep:
            raise ValueError(f"method {spec!r}: {kind} takes no value; write {kind!r}")
        return Method(kind)
    if not sep or not raw.strip():
        raise ValueError(f"method {spec!r}: {kind} needs its {meaning}, e.g. '{kind}:{_EXAMPLE[kind]}'")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"method {spec!r}: {meaning}={raw!r} is not a number") from None
    if meaning == "bits" and value not in ALLOWED_BITS:
        raise ValueError(f"method {spec!r}: bits={raw} is not allowed; use one of 1, 2, 4, 8")
    if meaning == "lambda" and not (math.isfinite(value) and value >= 1):
        raise ValueError(f"method {spec!r}: lambda={raw} is not allowed; use a compression ratio >= 1")
    if meaning == "rate" and not 0 <= value < 100:
        raise ValueError(f"method {spec!r}: compress_rate={raw} is not allowed; use a percentage in [0, 100)")
    return Method(kind, value)


_EXAMPLE = {"quant": "4", "blpa": "4", "wavelet": "10", "dct": "10", "threshold": "10", "bandlimit": "50"}


def default_methods(lambdas: Sequence[float] = (4, 10), rates: Sequence[float] = (50, 85)) -> list[Method]:
    """The full matrix: baseline, the two alternatives, every technique at the chosen settings."""
    specs = ["baseline", "bf16", "checkpoint", "quant:8", "quant:4", "quant:2", "blpa:4"]
    for codec in ("wavelet", "dct", "threshold"):
        specs += [f"{codec}:{lam:g}" for lam in lambdas]
    specs += [f"bandlimit:{rate:g}" for rate in rates]
    specs += ["csg"]
    return [parse_method(s) for s in specs]


def parse_methods(text: str, lambdas: Sequence[float] = (4, 10), rates: Sequence[float] = (50, 85)) -> list[Method]:
    """A comma-separated method list (``"all"`` for :func:`default_methods`); duplicates are dropped."""
    if text.strip().lower() == "all":
        return default_methods(lambdas, rates)
    methods: list[Method] = []
    for part in text.split(","):
        if part.strip():
            m = parse_method(part)
            if m not in methods:
                methods.append(m)
    if not methods:
        raise ValueError(f"--methods={text!r} names no method; allowed: all, or a comma-separated list of {_method_help()}")
    return methods


def _floats(option: str, text: str, check: Callable[[float], bool], allowed: str) -> list[float]:
    values = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            v = float(part)
        except ValueError:
            raise ValueError(f"{option}={text!r}: {part.strip()!r} is not a number") from None
        if not check(v):
            raise ValueError(f"{option}={text!r}: {part.strip()} is not allowed; use {allowed}")
        values.append(v)
    if not values:
        raise ValueError(f"{option}={text!r} names no value; use a comma-separated list of {allowed}")
    return values


# ---------------------------------------------------------------------------------------------------------
# configuration and networks
# ---------------------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """Everything a worker needs to rebuild the same network, input and training step."""

    network: str = "resnet18_cifar"
    batch_size: int | None = None
    input_size: int | None = None
    in_channels: int | None = None
    num_classes: int | None = None
    steps: int = 5
    warmup: int = 2
    timing: str = "interleaved"
    accuracy_epochs: int = 0
    device: str = "auto"
    seed: int = 0
    threads: int | None = None
    lr: float = 0.01
    csg_slice: tuple[int, ...] | None = None
    csg_code_size: int = 128
    checkpoint_modules: tuple[str, ...] | None = None
    band_fft_size: str = "power2"
    timeout: float = 3600.0
    peak_batch: int | None = None

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"--steps={self.steps} is not allowed; use 1 or more")
        if self.warmup < 0:
            raise ValueError(f"--warmup={self.warmup} is not allowed; use 0 or more")
        if self.timing not in TIMINGS:
            raise ValueError(f"--timing={self.timing!r} is not allowed; use one of {', '.join(TIMINGS)}")
        if self.device not in DEVICES:
            raise ValueError(f"--device={self.device!r} is not allowed; use one of {', '.join(DEVICES)}")
        if self.accuracy_epochs < 0:
            raise ValueError(f"--accuracy-epochs={self.accuracy_epochs} is not allowed; use 0 (off) or more")
        for option, value in (("--batch-size", self.batch_size), ("--input-size", self.input_size),
                              ("--in-channels", self.in_channels), ("--num-classes", self.num_classes),
                              ("--threads", self.threads)):
            if value is not None and value < 1:
                raise ValueError(f"{option}={value} is not allowed; use a positive integer")
        if not self.lr > 0:
            raise ValueError(f"--lr={self.lr} is not allowed; use a positive learning rate")
        if self.timeout <= 0:
            raise ValueError(f"--timeout={self.timeout} is not allowed; use a positive number of seconds")
        if self.peak_batch is not None and (self.peak_batch < 2 or (
                self.batch_size is not None and self.peak_batch <= self.batch_size)):
            raise ValueError(f"--peak-batch={self.peak_batch} is not allowed; use a batch size larger than "
                             f"--batch-size ({self.batch_size or 'the network default'})")
        if self.band_fft_size not in BAND_FFT_SIZES:
            raise ValueError(f"--band-fft-size={self.band_fft_size!r} is not allowed; use one of "
                             f"{', '.join(BAND_FFT_SIZES)}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device=cuda was given but no CUDA device is available; use --device cpu or auto")
        return torch.device(self.device)


@dataclass
class NetworkSpec:
    """A network by name, with the input it is benchmarked on."""

    name: str
    task: str  # "classification" or "segmentation"
    spatial_dims: int
    batch_size: int
    input_size: int
    in_channels: int
    num_classes: int
    build: Callable[[], nn.Module]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch_size, self.in_channels, *(self.input_size,) * self.spatial_dims)


class _TinyBlock(nn.Module):
    """Conv-BN-ReLU twice: a block for checkpointing in the tiny smoke-test network."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class TinyCNN(nn.Module):
    """A 3x3 stem and two 16-channel blocks, 4x4 pooled head: ``--network tiny_cnn`` for smoke tests."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.block1 = _TinyBlock(width, width)
        self.pool = nn.MaxPool2d(2)
        self.block2 = _TinyBlock(width, width)
        self.head_pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(width * 16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.block1(self.relu(self.bn(self.stem(x)))))
        return self.fc(torch.flatten(self.head_pool(self.block2(x)), 1))


_SEGMENTATION = re.compile(r"^(unet|segresnet|dynunet)([23])d$")


def _classification_builder(name: str) -> Callable[..., nn.Module]:
    try:
        from recipes.classification.networks import available_networks, build_network
    except ModuleNotFoundError:  # a checkout without the classification recipe: the CIFAR ResNet-18 only
        from recipes.classification.networks_cifar import resnet18_cifar

        if name != "resnet18_cifar":
            raise ValueError(f"--network={name!r} is not known; allowed: tiny_cnn, resnet18_cifar, unet2d, unet3d") from None
        return resnet18_cifar
    if name not in available_networks():
        raise ValueError(
            f"--network={name!r} is not known; allowed: tiny_cnn, unet2d, unet3d, segresnet2d/3d, dynunet2d/3d, "
            f"or a classification network of the recipes ({', '.join(available_networks()[:8])}, ..., any "
            "torchvision classifier)"
        )
    return lambda num_classes, in_channels: build_network(name, num_classes=num_classes, in_channels=in_channels)


def resolve_network(cfg: BenchConfig) -> NetworkSpec:
    """The network ``cfg.network`` names, with its default input where ``cfg`` leaves it open.

    Names: ``tiny_cnn`` (built in, for smoke tests), ``unet2d``/``unet3d`` (MONAI UNet, channels
    16-32-64-128, strides 2, two residual units), ``segresnet2d/3d``, ``dynunet2d/3d`` (from the
    segmentation recipe), and every classification network of the recipes (``resnet18_cifar``,
    ``resnet56_cifar``, ``densenet_bc``, torchvision classifiers).

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    name = cfg.network
    seg = _SEGMENTATION.match(name)
    if seg:
        arch, dims = seg.group(1), int(seg.group(2))
        size = cfg.input_size or (64 if dims == 3 else 128)
        batch = cfg.batch_size or (2 if dims == 3 else 8)
        cin, cout = cfg.in_channels or 1, cfg.num_classes or 2

        def build_seg() -> nn.Module:
            try:
                from recipes.segmentation.networks import build_segmentation_network
            except ModuleNotFoundError:
                if arch != "unet":
                    raise ValueError(f"--network={name!r} needs the segmentation recipe, which is not installed") from None
                from monai.networks.nets import UNet

                return UNet(dims, cin, cout, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)
            return build_segmentation_network(arch, dims, cin, cout)

        return NetworkSpec(name, "segmentation", dims, batch, size, cin, cout, build_seg)
    if name == "tiny_cnn":
        cin, classes = cfg.in_channels or 1, cfg.num_classes or 10
        return NetworkSpec(name, "classification", 2, cfg.batch_size or 32, cfg.input_size or 32, cin, classes,
                           lambda: TinyCNN(cin, classes))
    builder = _classification_builder(name)
    cin, classes = cfg.in_channels or 3, cfg.num_classes or 10
    return NetworkSpec(name, "classification", 2, cfg.batch_size or 128, cfg.input_size or 32, cin, classes,
                       lambda: builder(num_classes=classes, in_channels=cin))


# ---------------------------------------------------------------------------------------------------------
# the alternative: activation checkpointing over blocks
# ---------------------------------------------------------------------------------------------------------


class Checkpointed(nn.Module):
    """Runs the wrapped block under ``torch.utils.checkpoint`` (non-reentrant) while training with grad.

    Only the block's inputs are kept for backward; its inside is recomputed when backward reaches it.
    In eval mode or without grad it is the plain block. (Batch-norm layers inside see their forward twice
    in a training step, so their running statistics move twice per step, as with any checkpointing.)
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.block, *args, use_reentrant=False, **kwargs)
        return self.block(*args, **kwargs)


def _is_block(module: nn.Module, name: str) -> bool:
    cls = type(module).__name__
    return cls.endswith("Block") or cls.endswith("Bottleneck") or cls in ("ResidualUnit", "_DenseLayer")


def checkpoint_blocks(model: nn.Module, modules: Sequence[str] | None = None) -> list[str]:
    """Wrap, in place, the outermost selected blocks of ``model`` in :class:`Checkpointed`; returns their names.

    Args:
        modules: class names or qualified-name globs (see :mod:`lightning_memcomp.surgery`); default:
            every module whose class name ends in ``Block`` or ``Bottleneck`` (ResNet, DenseNet) and MONAI's
            ``ResidualUnit`` (each UNet level's convolutions).

    Raises:
        ValueError: the selection matched no module.
    """
    from lightning_memcomp.surgery import module_filter

    select = module_filter(list(modules) if modules else None, _is_block, option="--checkpoint-modules")
    wrapped: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, Checkpointed) or any(name.startswith(w + ".") for w in wrapped):
            continue
        if select(module, name):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, Checkpointed(module))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(
            f"--checkpoint-modules={list(modules) if modules else None!r} matched no block of "
            f"{type(model).__name__}; give class names or qualified-name globs of the blocks to checkpoint"
        )
    return wrapped


# ---------------------------------------------------------------------------------------------------------
# memory readings
# ---------------------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MemoryProbe:
    """After-forward growth and step peak: CUDA allocator counters, or process RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.peak_available = self.cuda or reset_peak_rss()


    def settle(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        try:
            return _rss()
        except OSError:
            from lightning_memcomp.memory.readings import process_rss

            return process_rss()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.peak_available:
            reset_peak_rss()

    def peak(self, start: int, resident: int) -> int | None:
        """The step's peak: ``max_memory_allocated`` on CUDA (absolute); on CPU the peak resident set
        (``VmHWM``) above the step's start plus ``resident``, the bytes of the state that lives across
        steps (parameters, buffers, optimizer state, the batch), so both devices count the same things."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        peak = peak_rss() if self.peak_available else None
        return None if peak is None else peak - start + resident


def _resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, *tensors: Tensor) -> int:
    """Bytes of the distinct storages of parameters, buffers, optimizer state and the given tensors."""
    seen: dict[int, int] = {}
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor)]
    for t in (*model.parameters(), *model.buffers(), *state, *tensors):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------------------
# the worker: one method, one process
# ---------------------------------------------------------------------------------------------------------


@dataclass
class MethodResult:
    """One row: the figures of a method, and (filled by the parent) its ratios to the baseline."""

    method: str
    description: str = ""
    family: str = ""
    status: str = "ok"  # ok | failed | unavailable
    error: str = ""
    notes: str = ""
    held_bytes: int | None = None
    held_raw_bytes: int | None = None
    after_forward_bytes: int | None = None
    step_peak_bytes: int | None = None
    #: with --peak-batch: (peak at the larger batch - peak at --batch-size) / (difference of the batch sizes)
    peak_per_sample_bytes: float | None = None
    step_time_s: float | None = None
    baseline_step_time_s: float | None = None
    step_time_alone_s: float | None = None
    trainable_params: int | None = None
    accuracy: float | None = None
    accuracy_metric: str = ""
    held_ratio: float | None = None
    after_forward_ratio: float | None = None
    step_peak_ratio: float | None = None
    #: the baseline's peak per sample over this method's: how many times larger a batch fits
    batch_multiplier: float | None = None
    time_ratio: float | None = None
    params_ratio: float | None = None
    pareto: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class _Prepared:
    """A network with the method applied, its optimizer, and the context to enter around each forward."""

    def __init__(self, method: Method, spec: NetworkSpec, cfg: BenchConfig, device: torch.device,
                 ledger: bool) -> None:
        from lightning_memcomp.memory.engine import track_saved_tensors
        from lightning_memcomp.surgery import count_parameters

        self.method = method
        self.device = device
        self.notes: list[str] = []
        model = spec.build().to(device)
        model.train()
        kind = method.kind
        if kind == "checkpoint":
            wrapped = checkpoint_blocks(model, cfg.checkpoint_modules)
            self.notes.append(f"{len(wrapped)} blocks checkpointed")
        elif kind == "bandlimit":
            from lightning_memcomp.bandlimit import band_limit

            with warnings.catch_warnings():  # skipped layers are counted in the notes instead
                warnings.simplefilter("ignore")
                report = band_limit(model, compress_rate=method.value, fft_size=cfg.band_fft_size)
            self.notes.append(f"{len(report.converted)} convs band-limited (fft_size={cfg.band_fft_size}), "
                              f"{len(report.skipped)} skipped")
        elif kind in ("csg", "bcsg"):
            from lightning_memcomp.csg import slice_generate

            slice_shape = cfg.csg_slice or (16, 16, *(3,) * spec.spatial_dims)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = slice_generate(model, slice_shape=slice_shape, code_size=cfg.csg_code_size,
                                        binary=kind == "bcsg")
            self.notes.append(
                f"{len(report.converted)} convs slice-generated (slice {'x'.join(map(str, slice_shape))}, "
                f"code {cfg.csg_code_size}), {len(report.skipped)} kept (first conv, 1x1, other kernels)"
            )
        self.model = model
        self.params = count_parameters(model)
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                         momentum=0.9)
        self.engine: Any = None
        if kind in CODEC_OF:
            from lightning_memcomp.compression.api import compress_activations

            options: dict[str, Any] = {}
            if kind in ("quant", "blpa"):
                options["bits"] = int(method.value)  # type: ignore[arg-type]
            else:
                options["compression_ratio"] = float(method.value)  # type: ignore[arg-type]
            self.engine = compress_activations(model, codec=CODEC_OF[kind], **options)
        elif ledger:
            self.engine = track_saved_tensors(model)
        self.autocast = kind == "bf16"

    @contextlib.contextmanager
    def forward_context(self, with_ledger: bool) -> Iterator[Any]:
        """The method's forward context; ``with_ledger`` adds the tracker for methods without their own engine."""
        with contextlib.ExitStack() as stack:
            ledger = None
            if self.engine is not None and (with_ledger or self.method.kind in CODEC_OF):
                ledger = stack.enter_context(self.engine)
            if self.autocast:
                stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
            yield ledger


def _random_batch(spec: NetworkSpec, device: torch.device, seed: int, batch: int | None = None
                  ) -> tuple[Tensor, Tensor]:
    if batch is not None:
        spec = replace(spec, batch_size=batch)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(spec.input_shape, generator=gen)
    if spec.task == "classification":
        y = torch.randint(0, spec.num_classes, (spec.batch_size,), generator=gen)
    else:
        y = torch.randint(0, spec.num_classes, (spec.batch_size, *spec.input_shape[2:]), generator=gen)
    return x.to(device), y.to(device)


@dataclass
class _Step:
    time_s: float
    after_forward: int | None = None
    peak: int | None = None
    held: int | None = None
    held_raw: int | None = None


def _train_step(prep: _Prepared, x: Tensor, y: Tensor, probe: _MemoryProbe, *, measure: bool,
                ledger: bool = False) -> _Step:
    """One training step; time excludes the garbage collections done for the memory readings."""
    prep.optimizer.zero_grad(set_to_none=True)
    paused = 0.0
    before = 0
    if measure:
        probe.settle()
        before = probe.current()
        probe.reset_peak()
    if probe.cuda:
        torch.cuda.synchronize(probe.device)
    t0 = time.perf_counter()
    with prep.forward_context(ledger) as led:
        loss = nn.functional.cross_entropy(prep.model(x), y)
    after = None
    if measure:
        tp = time.perf_counter()
        probe.settle()
        after = probe.current() - before
        paused += time.perf_counter() - tp
    loss.backward()
    prep.optimizer.step()
    if probe.cuda:
        torch.cuda.synchronize(probe.device)
    elapsed = time.perf_counter() - t0 - paused
    peak = probe.peak(before, _resident_bytes(prep.model, prep.optimizer, x, y)) if measure else None
    step = _Step(elapsed, after, peak)
    if led is not None:
        step.held, step.held_raw = led.stored_bytes, led.raw_bytes
    del loss
    return step


def _peak_per_sample(cfg: BenchConfig, spec: NetworkSpec, prep: _Prepared, probe: _MemoryProbe,
                     device: torch.device, peak_small: int | None) -> float | None:
    """The step peak's slope in the batch size: peak at ``cfg.peak_batch`` (after a warm-up step there) minus
    the peak at the network's batch, over the difference. Weights, optimizer state, libraries and workspace
    cancel; what remains is what one more sample costs at the step's peak."""
    if cfg.peak_batch is None or peak_small is None:
        return None
    if cfg.peak_batch <= spec.batch_size:
        raise ValueError(f"--peak-batch={cfg.peak_batch} is not allowed; use a batch size larger than "
                         f"{spec.batch_size}")
    x, y = _random_batch(spec, device, cfg.seed, cfg.peak_batch)
    _train_step(prep, x, y, probe, measure=False)
    peaks = [_train_step(prep, x, y, probe, measure=True).peak for _ in range(min(cfg.steps, 2))]
    if any(p is None for p in peaks):
        return None
    return (max(peaks) - peak_small) / (cfg.peak_batch - spec.batch_size)  # type: ignore[type-var]


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def run_worker(cfg: BenchConfig, method: Method) -> MethodResult:
    """Measure one method in this process (the parent runs it in a fresh one); see the module docstring.

    Phases: the method alone (``warmup`` steps, the last with the ledger, then ``steps`` measured steps);
    with ``timing="interleaved"`` a baseline model and ``steps`` pairs of baseline/method steps in
    alternating order; with ``accuracy_epochs`` a fresh model with the method trained on the recipe data.
    """
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.resolved_device()
    spec = resolve_network(cfg)
    result = MethodResult(method.name, method.description, method.family)
    gc.collect()
    probe = _MemoryProbe(device)

    torch.manual_seed(cfg.seed)
    prep = _Prepared(method, spec, cfg, device, ledger=True)
    result.notes = "; ".join(prep.notes)
    result.trainable_params = prep.params
    x, y = _random_batch(spec, device, cfg.seed)
    for i in range(cfg.warmup):
        step = _train_step(prep, x, y, probe, measure=False, ledger=i == cfg.warmup - 1)
        if step.held is not None:
            result.held_bytes, result.held_raw_bytes = step.held, step.held_raw
    measured = []
    for i in range(cfg.steps):
        step = _train_step(prep, x, y, probe, measure=True, ledger=result.held_bytes is None and i == 0)
        if step.held is not None and result.held_bytes is None:
            result.held_bytes, result.held_raw_bytes = step.held, step.held_raw
        measured.append(step)
    result.after_forward_bytes = int(_median([s.after_forward for s in measured]))  # type: ignore[misc]
    peaks = [s.peak for s in measured if s.peak is not None]
    result.step_peak_bytes = max(peaks) if peaks else None
    result.step_time_alone_s = _median([s.time_s for s in measured])
    result.step_time_s = result.step_time_alone_s
    if cfg.peak_batch is not None:
        result.peak_per_sample_bytes = _peak_per_sample(cfg, spec, prep, probe, device, result.step_peak_bytes)
    if cfg.timing == "interleaved" and method.kind != "baseline":
        torch.manual_seed(cfg.seed)
        base = _Prepared(Method("baseline"), spec, cfg, device, ledger=False)
        for _ in range(cfg.warmup):
            _train_step(base, x, y, probe, measure=False)
        times: dict[str, list[float]] = {"method": [], "baseline": []}
        for i in range(cfg.steps):
            order = (("method", prep), ("baseline", base)) if i % 2 else (("baseline", base), ("method", prep))
            for key, p in order:
                times[key].append(_train_step(p, x, y, probe, measure=False).time_s)
        result.step_time_s = _median(times["method"])
        result.baseline_step_time_s = _median(times["baseline"])
        result.time_ratio = result.step_time_s / result.baseline_step_time_s
        del base
    elif method.kind == "baseline":
        result.baseline_step_time_s = result.step_time_s
        result.time_ratio = 1.0
    del prep
    gc.collect()
    if cfg.accuracy_epochs:
        result.accuracy, result.accuracy_metric = _accuracy(cfg, spec, method, device)
    return result


# ---------------------------------------------------------------------------------------------------------
# accuracy on the recipe data
# ---------------------------------------------------------------------------------------------------------


def _accuracy(cfg: BenchConfig, spec: NetworkSpec, method: Method, device: torch.device) -> tuple[float, str]:
    """Train a fresh model with the method for ``cfg.accuracy_epochs`` epochs (Adam, lr 2e-3); test score.

    Classification: top-1 accuracy (%) on scikit-learn's digits (1,257 train / 360 test images, resized to
    the input size, repeated to the input channels). Segmentation: mean foreground Dice (%) on MONAI's
    synthetic circles/spheres (32 train / 8 test images of the input size).
    """
    torch.manual_seed(cfg.seed)
    prep = _Prepared(method, spec, cfg, device, ledger=False)
    opt = torch.optim.Adam([p for p in prep.model.parameters() if p.requires_grad], lr=2e-3)
    gen = torch.Generator().manual_seed(cfg.seed)
    if spec.task == "classification":
        from recipes.classification.digits import load_digits_32

        if spec.num_classes != 10:
            raise ValueError(f"--accuracy-epochs on the digits needs --num-classes=10, got {spec.num_classes}")
        data = load_digits_32(size=spec.input_size, channels=spec.in_channels, seed=cfg.seed)
        (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    else:
        from recipes.segmentation.data import SyntheticSegmentationDataModule

        rad_max = max(1, min(16, spec.input_size // 2 - 1))
        dm = SyntheticSegmentationDataModule(spatial_dims=spec.spatial_dims, image_size=spec.input_size,
                                             num_train=32, num_val=1, num_test=8, rad_min=min(5, rad_max),
                                             rad_max=rad_max, num_classes=spec.num_classes, seed=cfg.seed)
        dm.setup()
        train, test = dm._splits["train"], dm._splits["test"]
        x_train, y_train = train.images, train.labels[:, 0]
        x_test, y_test = test.images, test.labels[:, 0]
    for _ in range(cfg.accuracy_epochs):
        prep.model.train()
        for idx in torch.randperm(len(x_train), generator=gen).split(spec.batch_size):
            with prep.forward_context(False):
                loss = nn.functional.cross_entropy(prep.model(x_train[idx].to(device)), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    prep.model.eval()
    preds = []
    with torch.no_grad():
        for start in range(0, len(x_test), spec.batch_size):
            preds.append(prep.model(x_test[start:start + spec.batch_size].to(device)).argmax(1).cpu())
    pred = torch.cat(preds)
    if spec.task == "classification":
        return 100.0 * (pred == y_test).float().mean().item(), "top-1 % (digits)"
    dices = []
    for c in range(1, spec.num_classes):
        p, g = pred == c, y_test == c
        denom = p.sum() + g.sum()
        dices.append(1.0 if denom == 0 else (2.0 * (p & g).sum() / denom).item())
    return 100.0 * sum(dices) / len(dices), "Dice % (synthetic)"


# ---------------------------------------------------------------------------------------------------------
# the parent: one subprocess per method, ratios, outputs
# ---------------------------------------------------------------------------------------------------------


def _config_argv(cfg: BenchConfig) -> list[str]:
    argv = ["--network", cfg.network, "--steps", str(cfg.steps), "--warmup", str(cfg.warmup),
            "--timing", cfg.timing, "--accuracy-epochs", str(cfg.accuracy_epochs), "--device", cfg.device,
            "--seed", str(cfg.seed), "--lr", repr(cfg.lr), "--csg-code-size", str(cfg.csg_code_size),
            "--band-fft-size", cfg.band_fft_size]
    for option, value in (("--batch-size", cfg.batch_size), ("--input-size", cfg.input_size),
                          ("--in-channels", cfg.in_channels), ("--num-classes", cfg.num_classes),
                          ("--threads", cfg.threads), ("--peak-batch", cfg.peak_batch)):
        if value is not None:
            argv += [option, str(value)]
    if cfg.csg_slice:
        argv += ["--csg-slice", ",".join(map(str, cfg.csg_slice))]
    if cfg.checkpoint_modules:
        argv += ["--checkpoint-modules", ",".join(cfg.checkpoint_modules)]
    return argv


def _spawn(cfg: BenchConfig, method: Method) -> MethodResult:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "lightning_memcomp.bench", *_config_argv(cfg), "--worker", method.name]
    failed = MethodResult(method.name, method.description, method.family, status="failed")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=cfg.timeout)
    except subprocess.TimeoutExpired:
        failed.error = f"no result within --timeout={cfg.timeout:g} s"
        return failed
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return MethodResult.from_dict(json.loads(line[len(RESULT_MARKER):]))
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    failed.error = f"worker exited with status {proc.returncode}: " + (lines[-1] if lines else "no output")
    return failed


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def add_ratios(results: list[MethodResult], timing: str = "interleaved") -> None:
    """Fill each row's ratios to the baseline row and mark the rows on the memory/time Pareto front."""
    base = next((r for r in results if r.method == "baseline" and r.status == "ok"), None)
    for r in results:
        if r.status != "ok" or base is None:
            continue
        r.held_ratio = _ratio(r.held_bytes, base.held_bytes)
        r.after_forward_ratio = _ratio(r.after_forward_bytes, base.after_forward_bytes)
        r.step_peak_ratio = _ratio(r.step_peak_bytes, base.step_peak_bytes)
        r.batch_multiplier = _ratio(base.peak_per_sample_bytes, r.peak_per_sample_bytes)
        r.params_ratio = _ratio(r.trainable_params, base.trainable_params)
        if r is base:
            r.time_ratio = 1.0
        elif timing == "isolated" or r.time_ratio is None:
            r.time_ratio = _ratio(r.step_time_s, base.step_time_s)
    ok = [r for r in results if r.status == "ok" and r.held_bytes is not None and r.time_ratio is not None]
    for r in ok:
        r.pareto = not any(
            o is not r and o.held_bytes <= r.held_bytes and o.time_ratio <= r.time_ratio  # type: ignore[operator]
            and (o.held_bytes < r.held_bytes or o.time_ratio < r.time_ratio)  # type: ignore[operator]
            for o in ok
        )


def run_benchmark(
    cfg: BenchConfig,
    methods: Sequence[Method],
    *,
    progress: bool = True,
    jobs: int = 1,
    on_result: Callable[[list[MethodResult]], None] | None = None,
) -> list[MethodResult]:
    """Run every method in its own process (the baseline added when missing) and add the ratios.

    Args:
        jobs: workers running at the same time. Memory figures are per process and stay exact; step times
            slow down together, so with ``jobs > 1`` use ``timing="interleaved"``, whose ratios compare
            steps taken side by side in one worker.
        on_result: called with the rows measured so far (in method order, ratios filled) after each method,
            e.g. to write partial results during a long run.
    """
    cfg.validate()
    if jobs < 1:
        raise ValueError(f"--jobs={jobs} is not allowed; use 1 or more")
    resolve_network(cfg)  # fail here, once, on a bad name
    methods = list(methods)
    if Method("baseline") in methods:
        methods.remove(Method("baseline"))
    methods.insert(0, Method("baseline"))
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError:  # pragma: no cover - tqdm is a Lightning dependency
        tqdm = None
    bar = tqdm(total=len(methods), desc="memcomp bench", unit="method", file=sys.stderr,
               disable=not progress) if tqdm else None
    done: dict[Method, MethodResult] = {}

    def finished(method: Method, result: MethodResult) -> None:
        done[method] = result
        if bar is not None:
            bar.set_postfix_str(f"{method.name} {result.status}")
            bar.update(1)
        if on_result is not None:
            rows = [copy.copy(done[m]) for m in methods if m in done]
            add_ratios(rows, cfg.timing)
            on_result(rows)

    if jobs == 1:
        for method in methods:
            if bar is not None:
                bar.set_postfix_str(method.name)
            finished(method, _spawn(cfg, method))
    else:
        from concurrent.futures import ThreadPoolExecutor, as_completed

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(_spawn, cfg, m): m for m in methods}
            for future in as_completed(futures):
                finished(futures[future], future.result())
    if bar is not None:
        bar.close()
    results = [done[m] for m in methods]
    add_ratios(results, cfg.timing)
    return results


# ---------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------


def machine_info(device: torch.device | None = None) -> dict[str, str]:
    """CPU model, core count, torch version, GPU (or that none was there), date: the results' header."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (no CUDA device available)"
    try:
        load = " / ".join(f"{v:.1f}" for v in os.getloadavg()) + " (1/5/15 min)"
    except OSError:
        load = "unknown"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": gpu,
        "device": str(device) if device is not None else "",
        "load": load,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:.1f}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


COLUMNS = ("method", "held MiB", "x base", "after-fwd MiB", "x base", "step peak MiB", "x base", "step s",
           "x base", "params", "x base", "accuracy")


PER_SAMPLE_COLUMNS = ("peak/sample MiB", "batch x")


def _has_per_sample(results: Sequence[MethodResult]) -> bool:
    return any(r.peak_per_sample_bytes is not None for r in results)


def _per_sample_cells(r: MethodResult) -> list[str]:
    per_sample = None if r.peak_per_sample_bytes is None else r.peak_per_sample_bytes / 2**20
    return [_num(per_sample, ".2f"), _x(r.batch_multiplier)]


def _row(r: MethodResult, per_sample: bool = False) -> list[str]:
    columns = COLUMNS + (PER_SAMPLE_COLUMNS if per_sample else ())
    if r.status != "ok":
        return [r.method, f"{r.status}: {r.error}"] + [""] * (len(columns) - 2)
    cells = [r.method, _mib(r.held_bytes), _x(r.held_ratio), _mib(r.after_forward_bytes), _x(r.after_forward_ratio),
             _mib(r.step_peak_bytes), _x(r.step_peak_ratio), _num(r.step_time_s, ".3f"), _x(r.time_ratio),
             _num(r.trainable_params, ","), _x(r.params_ratio), _num(r.accuracy, ".1f")]
    return cells + (_per_sample_cells(r) if per_sample else [])


def format_table(results: Sequence[MethodResult]) -> str:
    """The terminal table: figures and their ratios to the baseline (with --peak-batch, peak per sample too)."""
    per_sample = _has_per_sample(results)
    header = list(COLUMNS + (PER_SAMPLE_COLUMNS if per_sample else ()))
    rows = [header] + [_row(r, per_sample) for r in results]
    ok_rows = [row for row, r in zip(rows[1:], results) if r.status == "ok"]
    widths = [max(len(row[i]) for row in [rows[0], *ok_rows]) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        if i and results[i - 1].status != "ok":
            lines.append(f"{row[0]:<{widths[0]}}  {row[1]}")
            continue
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(results: Sequence[MethodResult], path: Path) -> None:
    names = [f.name for f in fields(MethodResult)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for r in results:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})


def read_csv(path: str | Path) -> list[MethodResult]:
    """Read a CSV written by :func:`write_csv` back into results (empty cells become ``None``)."""
    types = {f.name: f.type for f in fields(MethodResult)}
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            data: dict[str, Any] = {}
            for k, v in row.items():
                t = str(types.get(k, "str"))
                if v == "" and "None" in t:
                    data[k] = None
                elif t.startswith("int"):
                    data[k] = int(v)
                elif t.startswith("float"):
                    data[k] = float(v)
                elif t.startswith("bool"):
                    data[k] = v == "True"
                else:
                    data[k] = v
            out.append(MethodResult.from_dict(data))
    return out


def format_markdown(results: Sequence[MethodResult], cfg: BenchConfig, spec: NetworkSpec,
                    info: dict[str, str], command: str, notes: Sequence[str] = (), pending: Sequence[str] = ()) -> str:
    """The markdown report: machine, settings, the table with ratios, the methods and what failed."""
    memory = "process RSS growth (MALLOC_MMAP_THRESHOLD_=65536)" if info["device"].startswith("cpu") else \
        "torch.cuda.memory_allocated"
    per_sample = _has_per_sample(results)
    peak = ("peak RSS (VmHWM, reset each step) above the step's start, plus the parameters, buffers, optimizer "
            "state and batch that live across steps" if info["device"].startswith("cpu")
            else "torch.cuda.max_memory_allocated, reset each step")
    lines = [
        f"# memcomp bench: {spec.name}, input {'x'.join(map(str, spec.input_shape))}, {info['device']}",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores; GPU: {info['gpu']}",
        f"- torch {info['torch']}, Python {info['python']}; {info['date']}; load average at the end "
        f"{info['load']}; torch threads per worker: {cfg.threads or 'torch default'}",
        f"- command: `{command}`",
        f"- {cfg.warmup} warm-up and {cfg.steps} measured training steps (forward, backward, SGD momentum "
        f"0.9) per method, each method in a fresh process; timing: {cfg.timing}"
        + (" (each worker alternates baseline and method steps; the ratio compares the two medians)"
           if cfg.timing == "interleaved" else " (ratios across processes)"),
        f"- held = bytes kept for backward (saved-tensor ledger); after-fwd = {memory}; step peak = {peak}",
        "",
        "| method | held MiB | held x | after-fwd MiB | after-fwd x | step peak MiB | peak x | step s | time x "
        "| params | params x | accuracy | Pareto |" + (" peak/sample MiB | batch x |" if per_sample else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|" + ("---:|---:|" if per_sample else ""),
    ]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.method} | {r.status}: {r.error} |" + " |" * (14 if per_sample else 12))
            continue
        lines.append(
            f"| {r.method} | {_mib(r.held_bytes)} | {_x(r.held_ratio)} | {_mib(r.after_forward_bytes)} | "
            f"{_x(r.after_forward_ratio)} | {_mib(r.step_peak_bytes)} | {_x(r.step_peak_ratio)} | "
            f"{_num(r.step_time_s, '.3f')} | {_x(r.time_ratio)} | {_num(r.trainable_params, ',')} | "
            f"{_x(r.params_ratio)} | {_num(r.accuracy, '.1f')} | {'yes' if r.pareto else ''} |"
            + ("".join(f" {c} |" for c in _per_sample_cells(r)) if per_sample else "")
        )
    metric = next((r.accuracy_metric for r in results if r.accuracy_metric), "")
    lines += ["", "x = ratio to the baseline row; Pareto = no other row holds fewer bytes for backward and is faster."]
    if per_sample:
        lines.append(f"peak/sample = (step peak at batch {cfg.peak_batch} - step peak at batch {spec.batch_size}) / "
                     f"{cfg.peak_batch - spec.batch_size}; batch x = the baseline's peak/sample over the method's: "
                     "how many times larger a batch fits.")
    if metric:
        lines.append(f"accuracy: {metric} after {cfg.accuracy_epochs} epoch(s), Adam lr 2e-3.")
    lines += ["", "| method | what it is | notes |", "|---|---|---|"]
    lines += [f"| {r.method} | {r.description} | {r.notes} |" for r in results]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    if pending:
        lines += ["", f"**Partial results**: still to measure: {', '.join(pending)}."]
    missing = [r for r in results if r.status != "ok"]
    if missing:
        lines += ["", "Not measured:"] + [f"- {r.method}: {r.status}: {r.error}" for r in missing]
    return "\n".join(lines) + "\n"


def plot(results: Sequence[MethodResult], path: Path, title: str) -> None:
    """PNG: memory saved (held for backward, after forward) against time added; accuracy where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok" and r.time_ratio is not None]
    with_acc = [r for r in ok if r.accuracy is not None]
    panels = [("held for backward", "held_ratio"), ("after forward", "after_forward_ratio")]
    n = len(panels) + (1 if with_acc else 0)
    fig, axes = plt.subplots(1, n, figsize=(6.2 * n, 5.2), squeeze=False)
    colors = {"baseline": "black", "alternative": "tab:red", "activation compression": "tab:blue",
              "band-limit": "tab:green", "slice generator": "tab:purple"}
    for ax, (label, attr) in zip(axes[0], panels):
        for r in ok:
            ratio = getattr(r, attr)
            if ratio is None:
                continue
            xs, ys = 100.0 * (r.time_ratio - 1.0), 100.0 * (1.0 - ratio)  # type: ignore[operator]
            ax.scatter(xs, ys, color=colors.get(r.family, "gray"), s=36, zorder=3)
            ax.annotate(r.method, (xs, ys), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.axhline(0, color="gray", lw=0.6)
        ax.axvline(0, color="gray", lw=0.6)
        ax.set_xlabel("time added per training step (%)")
        ax.set_ylabel(f"memory saved, {label} (%)")
        ax.grid(alpha=0.3)
    if with_acc:
        ax = axes[0][-1]
        for r in with_acc:
            ys = 100.0 * (1.0 - (r.held_ratio or 1.0))
            ax.scatter(r.accuracy, ys, color=colors.get(r.family, "gray"), s=36, zorder=3)
            ax.annotate(r.method, (r.accuracy, ys), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xlabel(with_acc[0].accuracy_metric or "accuracy")
        ax.set_ylabel("memory saved, held for backward (%)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in colors.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(colors), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: Sequence[MethodResult], cfg: BenchConfig, out: Path, name: str | None,
                  command: str, notes: Sequence[str] = (), pending: Sequence[str] = ()) -> dict[str, Path]:
    """CSV, markdown and PNG into ``out`` (created); returns their paths."""
    device = cfg.resolved_device()
    spec = resolve_network(cfg)
    info = machine_info(device)
    out.mkdir(parents=True, exist_ok=True)
    base = name or f"bench_{spec.name}_{device.type}"
    paths = {"csv": out / f"{base}.csv", "md": out / f"{base}.md", "png": out / f"{base}.png"}
    write_csv(results, paths["csv"])
    paths["md"].write_text(format_markdown(results, cfg, spec, info, command, notes, pending))
    plot(results, paths["png"], f"{spec.name} {'x'.join(map(str, spec.input_shape))} on {info['cpu'] if device.type == 'cpu' else info['gpu']}, "
         f"torch {info['torch']}, {info['date']}")
    return paths


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``memcomp bench`` argument parser; every option is documented in ``--help``."""
    p = argparse.ArgumentParser(
        prog="memcomp bench",
        description="Measure memory held for backward, memory after forward, step peak, step time, trainable "
                    "parameters and (optionally) accuracy of every memory-saving technique against the fp32 "
                    "baseline and the alternatives (bf16 autocast, activation checkpointing). Each method runs "
                    "in a fresh process; results go to the terminal (ratios to the baseline) and to CSV, "
                    "markdown and PNG files in --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=f"Methods: {_method_help()}. Example: memcomp bench --network resnet18_cifar --steps 3 --warmup 1",
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
        lambdas = _floats("--lambdas", args.lambdas, lambda v: math.isfinite(v) and v >= 1, "numbers >= 1")
        rates = _floats("--band-rates", args.band_rates, lambda v: 0 <= v < 100, "percentages in [0, 100)")
        if args.worker is not None:
            method = parse_method(args.worker)
        else:
            methods = parse_methods(args.methods, lambdas, rates)
            resolve_network(cfg)
            cfg.resolved_device()
    except ValueError as err:
        parser.error(str(err))
    if args.worker is not None:
        try:
            result = run_worker(cfg, method)
        except ModuleNotFoundError as err:
            if not (err.name or "").startswith(("lightning_memcomp", "recipes")):
                raise
            result = MethodResult(method.name, method.description, method.family, status="unavailable",
                                  error=f"{err.name} is not part of this installation")
        print(RESULT_MARKER + result.to_json(), flush=True)
        return 0
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


if __name__ == "__main__":
    sys.exit(main())
