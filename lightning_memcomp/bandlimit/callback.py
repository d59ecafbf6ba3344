"""``BandLimiting``: the Lightning callback over :func:`~lightning_memcomp.bandlimit.band_limit`."""

from __future__ import annotations

import warnings
from typing import Any

from typing_extensions import override

from lightning_memcomp import _lightning as pl
from lightning_memcomp._lightning import Callback, rank_zero_info
from lightning_memcomp.bandlimit.convert import ExampleInputError, band_limit, band_limited_layers
from lightning_memcomp.bandlimit.functional import (
    DEFAULT_FFT_SIZE,
    _check_fft_size,
    _check_on_larger,
    resolve_rates,
)
from lightning_memcomp.checkpoint import CHECKPOINT_KEY, check_resume, conversions_of
from lightning_memcomp.surgery import ConversionReport, ModuleSelection

__all__ = ["BandLimiting"]


class BandLimiting(Callback):
    """Band-limit the model's convolutions at setup (Dziedzic et al., ICML 2019).

    The conversion runs in ``setup`` (before ``configure_optimizers`` and before any strategy wraps the
    model; converted layers share the original parameter tensors), once per model whatever the number of
    stages. Before converting it estimates what each layer will hold for backward on the module's
    ``example_input_array`` when it has one (else each layer checks at its first forward pass) and warns, or
    refuses with ``on_larger="error"``, where a layer would hold more than the convolution it replaces.

    The conversion is recorded in the model's state dict and every checkpoint:
    :func:`lightning_memcomp.load_converted` rebuilds it anywhere, ``load_from_checkpoint`` on a module
    inheriting :class:`~lightning_memcomp.checkpoint.ConversionCheckpointMixin` too, and resuming
    (``Trainer.fit(ckpt_path=...)``) from a checkpoint converted otherwise fails with both conversions named
    (other band-limiting options only warn: this run's options are kept).

    Args:
        compress_rate: percent of each layer's one-sided spectrum discarded, in ``[0, 100)`` (default 50
            when ``preserve_energy`` is not given).
        preserve_energy: percent of the input spectrum's energy kept per batch, in ``(0, 100]``.
        modules: selection (default: every convolution with kernel > 1, the stem included; 1x1 left alone).
        fft_size: ``"minimal"`` (default, the smallest exact grid per layer), ``"fast"``, ``"linear"`` or
            ``"power2"`` (the paper's).
        on_larger: ``"warn"`` (default), ``"error"`` or ``"ignore"`` where a band-limited layer would hold more
            than its convolution (see :func:`~lightning_memcomp.bandlimit.band_limit`).
        log_compression: log ``band_limit/realized_compression`` (mean over layers) every training step.

    Raises:
        ValueError: invalid options (at construction).

    Example::

        trainer = Trainer(callbacks=[BandLimiting(compress_rate=50)])
        trainer.fit(model, datamodule=dm)
    """

    def __init__(
        self,
        compress_rate: float | None = None,
        preserve_energy: float | None = None,
        modules: ModuleSelection = None,
        fft_size: str = DEFAULT_FFT_SIZE,
        log_compression: bool = True,
        on_larger: str = "warn",
    ) -> None:
        self.compress_rate, self.preserve_energy = resolve_rates(compress_rate, preserve_energy)
        self.modules = modules
        self.fft_size = _check_fft_size(fft_size)
        self.on_larger = _check_on_larger(on_larger)
        self.log_compression = log_compression
        #: the report of the conversion done in ``setup`` (``None`` before it)
        self.report: ConversionReport | None = None
        self._converted: set[int] = set()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if id(pl_module) in self._converted:
            return
        options = dict(
            compress_rate=self.compress_rate,
            preserve_energy=self.preserve_energy,
            modules=self.modules,
            fft_size=self.fft_size,
            on_larger=self.on_larger,
        )
        example = getattr(pl_module, "example_input_array", None)
        try:
            self.report = band_limit(pl_module, **options, example_input=example)
        except ExampleInputError as err:  # it does not run through the model as it is at setup
            warnings.warn(
                f"BandLimiting: could not estimate on example_input_array ({err}); each "
                "layer checks its estimate at its first forward pass instead",
                stacklevel=2,
            )
            self.report = band_limit(pl_module, **options)
        self._converted.add(id(pl_module))
        rank_zero_info(f"BandLimiting ({stage}): {self.report}")
        if self.report.extra.get("estimate") is not None:
            rank_zero_info(self.report.extra["estimate"].summary())

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.log_compression:
            return
        layers = band_limited_layers(pl_module)
        values = [m.realized_compression for _, m in layers if m.realized_compression is not None]
        if values:
            pl_module.log("band_limit/realized_compression", sum(values) / len(values), on_step=True, on_epoch=False)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        specs = conversions_of(pl_module)
        if specs:
            checkpoint[CHECKPOINT_KEY] = specs

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning calls this after the weights loaded (the model's record checked them): the checkpoint's
        # conversions against this run's, also for checkpoints without a record in their state dict
        check_resume(pl_module, checkpoint)
