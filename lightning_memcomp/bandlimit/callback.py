"""``BandLimiting``: the Lightning callback over :func:`~lightning_memcomp.bandlimit.band_limit`."""

from __future__ import annotations

import warnings
from typing import Any

from typing_extensions import override

from lightning_memcomp import _lightning as pl
from lightning_memcomp._lightning import Callback, rank_zero_info
from lightning_memcomp.bandlimit.convert import TECHNIQUE, band_limit, band_limited_layers
from lightning_memcomp.bandlimit.functional import _check_fft_size, resolve_rates
from lightning_memcomp.checkpoint import CHECKPOINT_KEY, conversions_of, restore_conversions
from lightning_memcomp.surgery import ConversionReport, ModuleSelection

__all__ = ["BandLimiting"]


class BandLimiting(Callback):
    """Band-limit the model's convolutions at setup (Dziedzic et al., ICML 2019).

    The conversion runs in ``setup`` (before ``configure_optimizers`` and before any strategy wraps the
    model; converted layers share the original parameter tensors), once per model whatever the number of
    stages. The conversion spec is written into every checkpoint, so ``Trainer.fit(ckpt_path=...)`` and
    ``load_from_checkpoint`` on a module inheriting
    :class:`~lightning_memcomp.checkpoint.ConversionCheckpointMixin` rebuild the same layers.

    Args:
        compress_rate: percent of each layer's one-sided spectrum discarded, in ``[0, 100)`` (default 50
            when ``preserve_energy`` is not given).
        preserve_energy: percent of the input spectrum's energy kept per batch, in ``(0, 100]``.
        modules: selection (default: every convolution with kernel > 1, the stem included; 1x1 left alone).
        fft_size: ``"power2"`` (paper), ``"linear"`` or ``"minimal"``.
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
        fft_size: str = "power2",
        log_compression: bool = True,
    ) -> None:
        self.compress_rate, self.preserve_energy = resolve_rates(compress_rate, preserve_energy)
        self.modules = modules
        self.fft_size = _check_fft_size(fft_size)
        self.log_compression = log_compression
        #: the report of the conversion done in ``setup`` (``None`` before it)
        self.report: ConversionReport | None = None
        self._converted: set[int] = set()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if id(pl_module) in self._converted:
            return
        self.report = band_limit(
            pl_module,
            compress_rate=self.compress_rate,
            preserve_energy=self.preserve_energy,
            modules=self.modules,
            fft_size=self.fft_size,
        )
        self._converted.add(id(pl_module))
        rank_zero_info(f"BandLimiting ({stage}): {self.report}")

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
        saved = [s for s in checkpoint.get(CHECKPOINT_KEY, []) if s["technique"] == TECHNIQUE]
        mine = [s for s in conversions_of(pl_module) if s["technique"] == TECHNIQUE]
        if saved and mine and saved != mine:
            warnings.warn(
                f"BandLimiting: the checkpoint was band-limited with {[s['options'] for s in saved]}, this run "
                f"with {[s['options'] for s in mine]}; layers already converted keep this run's options",
                stacklevel=2,
            )
        restore_conversions(pl_module, checkpoint)
