"""Strategies that compress what each training step saves for backward: ``"memcomp"`` and ``"ddp_memcomp"``.

Importing this module registers both names in Lightning's ``StrategyRegistry``::

    import lightning_memcomp.strategies  # noqa: F401  (registers "memcomp" and "ddp_memcomp")
    trainer = Trainer(strategy="ddp_memcomp", devices=2)

Each ``training_step`` runs inside :func:`lightning_memcomp.compress_activations` on the LightningModule
(the same engine the :class:`~lightning_memcomp.ActivationCompression` callback opens), so the forward
pass stays exact and backward reads decoded activations; validation, test and predict steps are never
compressed. The ledger of the last training forward is ``strategy.memcomp_ledger`` (read by
:class:`~lightning_memcomp.MemoryMonitor`). From LightningCLI YAML::

    trainer:
      strategy:
        class_path: lightning_memcomp.strategies.DDPMemCompStrategy
        init_args: {codec: quant, bits: 4, codec_options: {group_size: 512}}
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.utilities.types import STEP_OUTPUT

from lightning_memcomp.compression.api import compress_activations
from lightning_memcomp.compression.graph import CompiledSaveEngine
from lightning_memcomp.compression.registry import make_codec
from lightning_memcomp.memory.engine import DEFAULT_MIN_BYTES, SavedTensorEngine
from lightning_memcomp.memory.ledger import Ledger
from lightning_memcomp.surgery import ModuleSelection

__all__ = ["DDPMemCompStrategy", "MemCompSingleDeviceStrategy", "register_strategies"]


class _CompressedTrainingStep:
    """Mixin: open a saved-tensor engine around the strategy's ``training_step``, close it on the way out."""

    memcomp_codec: str
    memcomp_options: dict[str, Any]
    _memcomp_engine: SavedTensorEngine | CompiledSaveEngine | None

    def _init_memcomp(
        self,
        codec: str,
        bits: int | None,
        modules: ModuleSelection,
        min_bytes: int,
        codec_options: dict[str, Any] | None,
    ) -> None:
        options = dict(codec_options or {})
        if bits is not None:
            if "bits" in options and options["bits"] != bits:
                raise ValueError(f"bits={bits!r} and codec_options['bits']={options['bits']!r} disagree; give one")
            options["bits"] = bits
        make_codec(codec, **options)  # fail at construction on a bad name or option
        self.memcomp_codec = codec
        self.memcomp_modules = modules
        self.memcomp_min_bytes = min_bytes
        self.memcomp_options = options
        self._memcomp_engine = None
        self._memcomp_rng_seed: int | None = None  # base seed of stochastic rounding, kept in checkpoints

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        checkpoint["memcomp_rng_seed"] = self._memcomp_rng_seed
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # type: ignore[misc]

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]
        if checkpoint.get("memcomp_rng_seed") is not None:
            self._memcomp_rng_seed = int(checkpoint["memcomp_rng_seed"])
        return checkpoint

    @property
    def memcomp_ledger(self) -> Ledger | None:
        """The ledger of the last training forward pass (``None`` before the first one)."""
        return self._memcomp_engine.ledger if self._memcomp_engine is not None else None

    def _engine_for(self, module: torch.nn.Module) -> SavedTensorEngine | CompiledSaveEngine:
        engine = self._memcomp_engine
        if engine is None or engine.model is not module:
            # a compiled module (also one compiled in configure_model) gets the graph-hook engine
            engine = compress_activations(module, self.memcomp_codec, modules=self.memcomp_modules,
                                          min_bytes=self.memcomp_min_bytes, **self.memcomp_options)
            self._memcomp_engine = engine
        return engine

    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        from lightning_memcomp.compression.callback import training_step_seed

        module = self.lightning_module  # type: ignore[attr-defined]
        engine = self._engine_for(module)
        if self._memcomp_rng_seed is None:
            self._memcomp_rng_seed = torch.initial_seed()
        engine.seed = self._memcomp_rng_seed
        trainer = module._trainer
        step = None
        if trainer is not None:
            step = training_step_seed(trainer, trainer.fit_loop.epoch_loop.batch_idx)
        engine.start(step=step)
        try:
            return super().training_step(*args, **kwargs)  # type: ignore[misc]
        finally:
            engine.stop()


class MemCompSingleDeviceStrategy(_CompressedTrainingStep, SingleDeviceStrategy):
    """Single-device training with compressed activations (registered as ``"memcomp"``).

    Args:
        codec: ``"quant"`` (default), ``"blpa"``, ``"wavelet"``, ``"dct"``, ``"threshold"`` or ``"identity"``.
        bits: bit width for ``quant``/``blpa`` (1, 2, 4 or 8).
        modules: which modules' saved tensors to compress (class names, qualified-name globs, a callable).
        min_bytes: smaller saved tensors are kept as they are.
        codec_options: the codec's own options, e.g. ``{"group_size": 512}``.
        device: the device to train on; default: the accelerator's current device (``cuda`` for GPUs).

    Raises:
        ValueError: unknown codec or a bad codec option (at construction).
        ValueError: a codec that cannot run inside compiled graphs (``wavelet``, ``dct``, ``threshold``) for a
            LightningModule that runs compiled (compiled models get the graph-hook engine; README, "Under
            torch.compile").
    """

    strategy_name = "memcomp"

    def __init__(
        self,
        codec: str = "quant",
        bits: int | None = None,
        modules: ModuleSelection = None,
        min_bytes: int = DEFAULT_MIN_BYTES,
        codec_options: dict[str, Any] | None = None,
        device: str | torch.device | int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device if device is not None else "cpu", **kwargs)
        self._device_given = device is not None
        self._init_memcomp(codec, bits, modules, min_bytes, codec_options)

    @property
    def root_device(self) -> torch.device:
        if not self._device_given and self.accelerator is not None:
            kind = type(self.accelerator).__name__
            if kind == "CUDAAccelerator" and torch.cuda.is_available():
                self._root_device = torch.device("cuda", torch.cuda.current_device())
            elif kind == "MPSAccelerator":
                self._root_device = torch.device("mps", 0)
            self._device_given = True
        return self._root_device

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="single device, activations compressed for backward (quant, 4 bits)",
            override=True,
        )


class DDPMemCompStrategy(_CompressedTrainingStep, DDPStrategy):
    """DDP training with compressed activations (registered as ``"ddp_memcomp"``, popen launcher).

    Args:
        codec, bits, modules, min_bytes, codec_options: as for :class:`MemCompSingleDeviceStrategy`.
        **kwargs: :class:`~lightning.pytorch.strategies.DDPStrategy` arguments (``find_unused_parameters``,
            ``start_method``, ...) and keyword arguments for ``DistributedDataParallel``.
    """

    strategy_name = "ddp_memcomp"

    def __init__(
        self,
        codec: str = "quant",
        bits: int | None = None,
        modules: ModuleSelection = None,
        min_bytes: int = DEFAULT_MIN_BYTES,
        codec_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._init_memcomp(codec, bits, modules, min_bytes, codec_options)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="DDP (popen), activations compressed for backward (quant, 4 bits)",
            start_method="popen", override=True,
        )
        strategy_registry.register(
            "ddp_spawn_memcomp", cls, description="DDP (spawn), activations compressed for backward (quant, 4 bits)",
            start_method="spawn", override=True,
        )


def register_strategies(registry: Any = StrategyRegistry) -> None:
    """Register ``"memcomp"``, ``"ddp_memcomp"`` and ``"ddp_spawn_memcomp"`` (done on import)."""
    MemCompSingleDeviceStrategy.register_strategies(registry)
    DDPMemCompStrategy.register_strategies(registry)


register_strategies()
