"""A method applied to a network: the model, its optimizer, and the context each forward runs in."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_memcomp.bench.checkpointing import checkpoint_blocks
from lightning_memcomp.bench.config import BenchConfig
from lightning_memcomp.bench.methods import CODEC_OF, Method
from lightning_memcomp.bench.networks import NetworkSpec

__all__ = ["AppliedMethod", "PreparedModel", "apply_method"]


@dataclass
class AppliedMethod:
    """What :func:`apply_method` did to a model: notes for the report, the engine to enter around each forward
    (``None``: none), whether the forward runs under bf16 autocast."""

    notes: list[str] = field(default_factory=list)
    engine: Any = None
    autocast: bool = False


def apply_method(model: nn.Module, method: Method, cfg: BenchConfig, *, spatial_dims: int = 2,
                 ledger: bool = False) -> AppliedMethod:
    """Apply ``method`` to ``model`` in place (conversions, checkpointing) and return its engine and autocast.

    ``cfg`` gives the options (``checkpoint_modules``, ``band_fft_size``, ``csg_slice``, ``csg_code_size``);
    ``ledger`` adds a tracking engine to methods that have none of their own.
    """
    from lightning_memcomp.memory.engine import track_saved_tensors

    applied = AppliedMethod()
    kind = method.kind
    if kind == "checkpoint":
        wrapped = checkpoint_blocks(model, cfg.checkpoint_modules)
        applied.notes.append(f"{len(wrapped)} blocks checkpointed")
    elif kind == "bandlimit":
        from lightning_memcomp.bandlimit import band_limit

        with warnings.catch_warnings():  # skipped layers are counted in the notes instead
            warnings.simplefilter("ignore")
            report = band_limit(model, compress_rate=method.value, fft_size=cfg.band_fft_size)
        applied.notes.append(f"{len(report.converted)} convs band-limited (fft_size={cfg.band_fft_size}), "
                             f"{len(report.skipped)} skipped")
    elif kind in ("csg", "bcsg"):
        from lightning_memcomp.csg import slice_generate

        slice_shape = cfg.csg_slice or (16, 16, *(3,) * spatial_dims)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = slice_generate(model, slice_shape=slice_shape, code_size=cfg.csg_code_size,
                                    binary=kind == "bcsg")
        applied.notes.append(
            f"{len(report.converted)} convs slice-generated (slice {'x'.join(map(str, slice_shape))}, "
            f"code {cfg.csg_code_size}), {len(report.skipped)} kept (first conv, 1x1, other kernels)"
        )
    if kind in CODEC_OF:
        from lightning_memcomp.compression.api import compress_activations

        options: dict[str, Any] = {}
        if kind in ("quant", "blpa"):
            options["bits"] = int(method.value)  # type: ignore[arg-type]
        else:
            options["compression_ratio"] = float(method.value)  # type: ignore[arg-type]
        applied.engine = compress_activations(model, codec=CODEC_OF[kind], **options)
    elif kind == "floor":
        from lightning_memcomp.bench.floor import FloorCodec
        from lightning_memcomp.compression.api import compress_activations

        applied.engine = compress_activations(model, codec=FloorCodec(bits=int(method.value)))  # type: ignore[arg-type]
        applied.notes.append("stand-in: holds a quant-sized payload, decodes to zeros; its gradients are not real")
    elif ledger:
        applied.engine = track_saved_tensors(model)
    applied.autocast = kind == "bf16"
    return applied


class PreparedModel:
    """A network with the method applied, its optimizer, and the context to enter around each forward."""

    def __init__(self, method: Method, spec: NetworkSpec, cfg: BenchConfig, device: torch.device,
                 ledger: bool) -> None:
        from lightning_memcomp.surgery import count_parameters

        self.method = method
        self.device = device
        model = spec.build().to(device)
        model.train()
        if cfg.compile:  # in place (no _orig_mod prefix); conversions below replace submodules before any trace
            model.compile()
        applied = apply_method(model, method, cfg, spatial_dims=spec.spatial_dims, ledger=ledger)
        self.notes: list[str] = applied.notes
        self.model = model
        self.params = count_parameters(model)
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                         momentum=0.9)
        self.engine: Any = applied.engine
        self.autocast = applied.autocast

    @contextlib.contextmanager
    def forward_context(self, with_ledger: bool) -> Iterator[Any]:
        """The method's forward context; ``with_ledger`` adds the tracker for methods without their own engine."""
        with contextlib.ExitStack() as stack:
            ledger = None
            if self.engine is not None and (with_ledger or self.method.kind in (*CODEC_OF, "floor")):
                ledger = stack.enter_context(self.engine)
            if self.autocast:
                stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
            yield ledger

