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

Both Lightning packages: a ``Trainer`` accepts only strategies that subclass its own package's ``Strategy``, so
the classes below are built for each installed package from one definition (:func:`strategies_for`) and the
names are registered in each package's ``StrategyRegistry``:

- ``lightning_memcomp.strategies.MemCompSingleDeviceStrategy`` / ``DDPMemCompStrategy``: for ``lightning``
  (``lightning.pytorch``), or for ``pytorch_lightning`` when ``lightning`` is not installed;
- ``lightning_memcomp.strategies.pytorch_lightning.MemCompSingleDeviceStrategy`` / ``DDPMemCompStrategy``:
  for ``pytorch_lightning``.

Lightning looks ``strategy="memcomp"`` up before it loads any plugin entry point, so the names exist only
once this module was imported (``import lightning_memcomp`` does it). Without that import, give the class
path (``--trainer.strategy=lightning_memcomp.strategies.DDPMemCompStrategy`` in LightningCLI) or an instance.

Seed policy of stochastic rounding: every rank uses the same base seed (``torch.initial_seed()``, which
``seed_everything`` makes equal on all ranks; saved in checkpoints) and draws from ``(base seed, global step,
batch index, global rank)`` (:func:`distributed_step_seed`): rank 0 draws as a single-device run does, and
the ranks' rounding errors are independent, as their data are, instead of sharing one dither.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

from lightning_memcomp._lightning import PACKAGES
from lightning_memcomp.compression.api import compress_activations, resolve_policy
from lightning_memcomp.compression.graph import CompiledSaveEngine
from lightning_memcomp.compression.registry import make_codec
from lightning_memcomp.memory.engine import DEFAULT_MIN_BYTES, SavedTensorEngine, mix_seed
from lightning_memcomp.memory.ledger import Ledger
from lightning_memcomp.surgery import ModuleSelection

__all__ = [
    "DDPMemCompStrategy",
    "MemCompSingleDeviceStrategy",
    "distributed_step_seed",
    "register_strategies",
    "strategies_for",
]

#: the module each package's classes live in (their ``__module__``: pickling and class paths find them there)
_HOME = {"lightning.pytorch": __name__, "pytorch_lightning": f"{__name__}.pytorch_lightning"}


def distributed_step_seed(trainer: Any, batch_idx: int) -> int:
    """The step number a rank's engine reseeds from: ``training_step_seed`` (global step, batch index) of
    :mod:`lightning_memcomp.compression.callback`, mixed with the global rank on ranks other than 0."""
    from lightning_memcomp.compression.callback import training_step_seed

    step = training_step_seed(trainer, batch_idx)
    rank = int(getattr(trainer, "global_rank", 0))
    return step if rank == 0 else mix_seed(step, rank)


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
        policy: Any = "default",
    ) -> None:
        options = dict(codec_options or {})
        if bits is not None:
            if "bits" in options and options["bits"] != bits:
                raise ValueError(f"bits={bits!r} and codec_options['bits']={options['bits']!r} disagree; give one")
            options["bits"] = bits
        resolve_policy(policy, make_codec(codec, **options))  # fail at construction on a bad name or option
        self.memcomp_policy = policy
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
                                          min_bytes=self.memcomp_min_bytes, policy=self.memcomp_policy,
                                          **self.memcomp_options)
            self._memcomp_engine = engine
        return engine

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        module = self.lightning_module  # type: ignore[attr-defined]
        engine = self._engine_for(module)
        if self._memcomp_rng_seed is None:
            self._memcomp_rng_seed = torch.initial_seed()
        engine.seed = self._memcomp_rng_seed
        trainer = module._trainer
        step = None
        if trainer is not None:
            step = distributed_step_seed(trainer, trainer.fit_loop.epoch_loop.batch_idx)
        engine.start(step=step)
        try:
            return super().training_step(*args, **kwargs)  # type: ignore[misc]
        finally:
            engine.stop()


class _MemCompSingleDevice(_CompressedTrainingStep):
    """Single-device training with compressed activations (registered as ``"memcomp"``).

    Args:
        codec: ``"quant"`` (default), ``"blpa"``, ``"wavelet"``, ``"dct"``, ``"threshold"`` or ``"identity"``.
        bits: bit width for ``quant``/``blpa`` (1, 2, 4 or 8).
        modules: which modules' saved tensors to compress (class names, qualified-name globs, a callable).
        min_bytes: smaller saved tensors are kept as they are.
        codec_options: the codec's own options, e.g. ``{"group_size": 512}``.
        device: the device to train on; default: the accelerator's current device (``cuda`` for GPUs).
        policy: the precision policy (:func:`lightning_memcomp.compress_activations`): ``"default"``, ``"off"``,
            or a dict of :class:`~lightning_memcomp.PrecisionPolicy` fields.

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
        policy: str | dict[str, Any] | None = "default",
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device if device is not None else "cpu", **kwargs)
        self._device_given = device is not None
        self._init_memcomp(codec, bits, modules, min_bytes, codec_options, policy)

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


class _DDPMemComp(_CompressedTrainingStep):
    """DDP training with compressed activations (registered as ``"ddp_memcomp"``, popen launcher).

    Args:
        codec, bits, modules, min_bytes, codec_options, policy: as for :class:`MemCompSingleDeviceStrategy`.
        **kwargs: the package's ``DDPStrategy`` arguments (``find_unused_parameters``,
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
        policy: str | dict[str, Any] | None = "default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._init_memcomp(codec, bits, modules, min_bytes, codec_options, policy)

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


@functools.cache
def strategies_for(package: str) -> tuple[type, type]:
    """``(MemCompSingleDeviceStrategy, DDPMemCompStrategy)`` for ``package`` (``"lightning.pytorch"`` or
    ``"pytorch_lightning"``): subclasses of its ``SingleDeviceStrategy`` and ``DDPStrategy``, built once.

    Raises:
        ValueError: ``package`` is neither of the two.
        ImportError: ``package`` is not installed.
    """
    if package not in _HOME:
        raise ValueError(f"package={package!r} is not a Lightning package; use one of {sorted(_HOME)}")
    strategies = importlib.import_module(f"{package}.strategies")
    built = []
    for name, mixin, base in (
        ("MemCompSingleDeviceStrategy", _MemCompSingleDevice, strategies.SingleDeviceStrategy),
        ("DDPMemCompStrategy", _DDPMemComp, strategies.DDPStrategy),
    ):
        attrs = {"__module__": _HOME[package], "__qualname__": name, "__doc__": mixin.__doc__}
        built.append(type(name, (mixin, base), attrs))
    return built[0], built[1]


def register_strategies(registry: Any = None) -> None:
    """Register ``"memcomp"``, ``"ddp_memcomp"`` and ``"ddp_spawn_memcomp"`` in ``registry``, a package's
    ``StrategyRegistry`` (default: that of every installed Lightning package; done on import).

    Raises:
        ValueError: ``registry`` is not the ``StrategyRegistry`` of an installed Lightning package.
    """
    targets = {p.__name__: p.strategies.StrategyRegistry for p in PACKAGES}
    if registry is not None:
        targets = {name: r for name, r in targets.items() if r is registry}
        if not targets:
            raise ValueError(
                f"registry={registry!r} is not the StrategyRegistry of an installed Lightning package; give "
                "lightning.pytorch.strategies.StrategyRegistry or pytorch_lightning.strategies.StrategyRegistry"
            )
    for package, target in targets.items():
        for cls in strategies_for(package):
            cls.register_strategies(target)


#: for ``lightning``; for ``pytorch_lightning`` when ``lightning`` is not installed
MemCompSingleDeviceStrategy, DDPMemCompStrategy = strategies_for(PACKAGES[0].__name__)
register_strategies()
