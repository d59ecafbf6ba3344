"""``ActivationCompression``: compress what the training forward pass saves for backward."""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import override

from lightning_memcomp import _lightning as pl
from lightning_memcomp._lightning import Callback, rank_zero_info, reject_sharded
from lightning_memcomp.compression.api import compress_activations, resolve_policy
from lightning_memcomp.compression.graph import CompiledSaveEngine, has_compiled_parts
from lightning_memcomp.compression.registry import make_codec
from lightning_memcomp.compression.smooth import PrecisionPolicy
from lightning_memcomp.memory.engine import DEFAULT_MIN_BYTES, SavedTensorEngine, mix_seed
from lightning_memcomp.memory.lean_conv import check_chunk_bytes
from lightning_memcomp.memory.ledger import Ledger, MiB
from lightning_memcomp.surgery import ModuleSelection

__all__ = ["ActivationCompression", "training_step_seed"]


def training_step_seed(trainer: pl.Trainer, batch_idx: int) -> int:
    """The step number the engine reseeds from: the global step and the batch index, both restored on resume."""
    return mix_seed(trainer.global_step, batch_idx)


class ActivationCompression(Callback):
    """Encode the tensors the training forward pass saves for backward; the forward stays exact.

    Active only between ``on_train_batch_start`` and ``on_before_backward`` (never in validation, test
    or predict), and closed on exceptions. Works under DDP and mixed precision (autocast copies of
    weights are recognised as parameters and never encoded).

    Args:
        codec: ``"quant"`` (default), ``"blpa"``, ``"wavelet"``, ``"dct"``, ``"threshold"`` or
            ``"identity"``; see :func:`lightning_memcomp.compress_activations`.
        bits: bit width for ``quant``/``blpa`` (1, 2, 4 or 8).
        modules: which modules' saved tensors to compress (class names, qualified-name globs, or a
            callable ``(module, name) -> bool``); default: every module, so everything the forward saves.
        min_bytes: tensors smaller than this are kept as they are.
        log_every_n_steps: how often to log ``memory/held_raw_mib`` and ``memory/held_stored_mib``
            when no :class:`~lightning_memcomp.MemoryMonitor` is present (which then logs them).
        seed: base seed of stochastic rounding; default ``torch.initial_seed()`` at setup (the seed
            ``seed_everything`` set). Each training batch draws from ``(seed, global step, batch index)``,
            and the seed is saved in the checkpoint, so a resumed run rounds as the uninterrupted one.
        conv_chunk_bytes: the compressed convolutions' backward decodes their saved input a slice of the batch
            at a time, of about this many bytes (``None``: 4 MiB on CPU, 64 MiB on CUDA; ``0``: off); see
            :func:`lightning_memcomp.compress_activations`.
        policy: what some saved tensors get instead of the bulk codec (default: smooth activations keep their
            derivative in 8 bits); ``"off"`` switches it off; see :func:`lightning_memcomp.compress_activations`.
        **options: the codec's own options (``group_size``, ``compression_ratio``, ``wavelet``, ...).

    Raises:
        ValueError: unknown codec, or an option the codec does not allow (checked at construction).
        RuntimeError: at setup, a strategy that shards parameters (FSDP, DeepSpeed, ModelParallel): the weights
            it gathers for each forward would be encoded like activations.
        ValueError: at train start, a codec that cannot run inside compiled graphs (``wavelet``, ``dct``,
            ``threshold``) on a model that runs compiled.

    Compiled models (``torch.compile(module)``, a LightningModule that compiles its network in
    ``configure_model``, ``Trainer.fit(torch.compile(module))``) get the graph-hook engine
    (:class:`~lightning_memcomp.compression.graph.CompiledSaveEngine`): the choice is made again at train start,
    after ``configure_model`` ran.

    Example::

        trainer = Trainer(callbacks=[ActivationCompression(codec="quant", bits=4), MemoryMonitor()])
    """

    def __init__(
        self,
        codec: str = "quant",
        bits: int | None = None,
        modules: ModuleSelection = None,
        min_bytes: int = DEFAULT_MIN_BYTES,
        log_every_n_steps: int = 50,
        seed: int | None = None,
        conv_chunk_bytes: int | None = None,
        policy: str | PrecisionPolicy | dict[str, Any] | None = "default",
        **options: Any,
    ) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed={seed!r} is not allowed; use an int or None (torch.initial_seed())")
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps={log_every_n_steps!r} must be a positive integer")
        if bits is not None:
            options["bits"] = bits
        resolve_policy(policy, make_codec(codec, **options))  # fail early on bad names/options
        self.conv_chunk_bytes = check_chunk_bytes(conv_chunk_bytes)
        self.codec = codec
        self.modules = modules
        self.min_bytes = min_bytes
        self.options = options
        self.policy = policy
        self.log_every_n_steps = log_every_n_steps
        self.seed = seed
        self._rng_seed: int | None = seed  # the base seed in use (restored from checkpoints)
        self._engine: SavedTensorEngine | CompiledSaveEngine | None = None
        self._monitor_present = False

    @property
    def memcomp_ledger(self) -> Ledger | None:
        """The ledger of the last training forward pass (read by ``MemoryMonitor``)."""
        return self._engine.ledger if self._engine is not None else None

    def _ensure_engine(self, pl_module: pl.LightningModule) -> None:
        compiled = has_compiled_parts(pl_module)
        engine = self._engine
        if engine is None or engine.model is not pl_module or getattr(engine, "compiled", False) != compiled:
            self._engine = compress_activations(
                pl_module, self.codec, modules=self.modules, min_bytes=self.min_bytes,
                conv_chunk_bytes=None if compiled else self.conv_chunk_bytes, policy=self.policy, **self.options
            )
            where = " inside the compiled graphs" if compiled else ""
            policy = getattr(self._engine, "policy", None)
            rank_zero_info(f"ActivationCompression: codec={self.codec} options={self.options} policy={policy}{where}")
        self._engine.seed = self._rng_seed

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        reject_sharded(trainer, "ActivationCompression")  # gathered weights would be encoded as activations
        if self._rng_seed is None:
            self._rng_seed = torch.initial_seed()
        self._ensure_engine(pl_module)
        self._monitor_present = any(
            type(cb).__name__ == "MemoryMonitor" for cb in trainer.callbacks  # type: ignore[attr-defined]
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_engine(pl_module)  # configure_model (which may compile) runs after setup

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._engine is not None and not self._engine.active:
            self._engine.seed = self._rng_seed
            self._engine.start(step=training_step_seed(trainer, batch_idx))

    def _close(self) -> None:
        if self._engine is not None and self._engine.active:
            self._engine.stop()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        self._close()
        ledger = self.memcomp_ledger
        if ledger is None or self._monitor_present or trainer.global_step % self.log_every_n_steps:
            return
        metrics = {
            "memory/held_raw_mib": ledger.raw_bytes / MiB,
            "memory/held_stored_mib": ledger.stored_bytes / MiB,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # a training_step that returned None never reaches on_before_backward
        self._close()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"codec": self.codec, "options": dict(self.options), "rng_seed": self._rng_seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("rng_seed") is not None:
            self._rng_seed = int(state_dict["rng_seed"])
