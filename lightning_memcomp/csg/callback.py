"""``ConvSliceGeneration``: convert a LightningModule to slice-generated convolutions at setup."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from typing_extensions import override

from lightning_memcomp import _lightning as pl
from lightning_memcomp._lightning import Callback, rank_zero_info
from lightning_memcomp.checkpoint import CHECKPOINT_KEY, check_resume, conversions_of
from lightning_memcomp.csg.convert import _BINARY_FIT, slice_generate
from lightning_memcomp.csg.generator import GeneratorSource, check_slice_options
from lightning_memcomp.csg.layers import INITS, SliceConv
from lightning_memcomp.surgery import ConversionReport, ModuleSelection, count_parameters

__all__ = ["ConvSliceGeneration"]


class ConvSliceGeneration(Callback):
    """Generate convolution filters from codes with one shared slice generator (CSG/BCSG, Omidvar et al., 2021).

    Converts the LightningModule in ``setup`` — before ``configure_optimizers`` and before DDP wraps
    the model, so optimizers see the codes and the generator — with
    :func:`~lightning_memcomp.csg.slice_generate` and the same options; logs the trainable parameters
    before and after and their ratio (``csg/params_before``, ``csg/params_after``,
    ``csg/param_ratio``). The conversion is written into checkpoints, so ``Trainer(ckpt_path=...)`` and
    ``load_from_checkpoint`` (with :class:`~lightning_memcomp.checkpoint.ConversionCheckpointMixin`)
    rebuild it. Works with DDP: the generator is one parameter of the module tree.

    Args:
        slice_shape, code_size, binary, generator, modules, init, train_generator: as for
            :func:`~lightning_memcomp.csg.slice_generate`.
        verbose: print the conversion report (rank zero).

    Raises:
        ValueError: invalid options (at construction).
        RuntimeError: a sharded strategy (FSDP, DeepSpeed, model parallel) at setup: the shared
            generator must stay one whole parameter.

    Example::

        trainer = Trainer(callbacks=[ConvSliceGeneration(slice_shape=(16, 16, 3, 3), code_size=128)])
    """

    def __init__(
        self,
        slice_shape: Sequence[int] | None = None,
        code_size: int | None = None,
        binary: bool = False,
        generator: GeneratorSource | None = None,
        modules: ModuleSelection = None,
        init: str = "kaiming",
        train_generator: bool | None = None,
        verbose: bool = True,
    ) -> None:
        if slice_shape is not None or code_size is not None:
            check_slice_options(slice_shape or (16, 16, 3, 3), code_size or 128)
        if init not in INITS:
            raise ValueError(f"init={init!r} is not allowed; use one of {', '.join(map(repr, INITS))}")
        if binary and init == "fit":
            raise ValueError(_BINARY_FIT)
        if binary and train_generator:
            raise ValueError("train_generator=True is not allowed with binary=True: BCSG is fixed and never trained")
        self.options: dict[str, Any] = dict(
            slice_shape=slice_shape,
            code_size=code_size,
            binary=binary,
            generator=generator,
            modules=modules,
            init=init,
            train_generator=train_generator,
        )
        self.verbose = verbose
        self.report: ConversionReport | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _reject_sharded(trainer)
        if any(isinstance(m, SliceConv) for m in pl_module.modules()):
            return  # converted by an earlier stage, or rebuilt from a checkpoint: setup is idempotent
        self.report = slice_generate(pl_module, **self.options)
        if self.verbose:
            rank_zero_info(str(self.report))
        metrics = {
            "csg/params_before": float(self.report.params_before),
            "csg/params_after": float(count_parameters(pl_module)),
            "csg/param_ratio": float(self.report.param_ratio),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CHECKPOINT_KEY] = conversions_of(pl_module)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning calls this after the weights loaded (the model's record checked them); setup converted with
        # this callback's options: a checkpoint converted otherwise fails here with both named
        check_resume(pl_module, checkpoint)


def _reject_sharded(trainer: pl.Trainer) -> None:
    if isinstance(trainer.strategy, pl.ShardedStrategies):
        raise RuntimeError(
            f"ConvSliceGeneration does not support strategy={type(trainer.strategy).__name__}: the generator shared by "
            "all converted layers must stay one whole parameter; use a single device or strategy='ddp'"
        )
