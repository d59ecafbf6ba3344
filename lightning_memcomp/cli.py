"""The ``memcomp`` command: LightningCLI over the shipped recipes, with every callback of ours by short name.

::

    memcomp fit --config recipes/configs/digits_quant4.yaml           # train, test, print a summary
    memcomp fit --config recipes/configs/digits_baseline.yaml --trainer.max_epochs=3
    memcomp fit --config recipes/configs/digits_baseline.yaml \\
        --trainer.callbacks+=ActivationCompression --trainer.callbacks.codec=quant --trainer.callbacks.bits=2
    memcomp test --config recipes/configs/digits_quant4.yaml --ckpt_path path/to/last.ckpt
    memcomp bench ...                                                  # the benchmark (lightning_memcomp.bench)
    memcomp kernels --build                                            # compile the C++/CUDA kernels

Models and data are given in subclass mode (``class_path: ImageClassifier``, ``class_path:
DigitsDataModule``; any LightningModule/LightningDataModule by full import path also works). Our
callbacks (``ActivationCompression``, ``MemoryMonitor``, ``BandLimiting``, ``ConvSliceGeneration``) and
strategies (``memcomp``, ``ddp_memcomp``) resolve by short name because this module imports them before
parsing. After ``fit`` the command runs ``test`` on the trained weights (``--test_after_fit=false`` to
skip) and prints a summary: test metrics, bytes held for backward raw vs stored, and where the logs are.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["MemcompCLI", "check_combination", "format_summary", "main", "register_components"]

#: Modules imported before parsing so that their classes resolve by short name in YAML and on the
#: command line (jsonargparse resolves ``class_path: Name`` among the imported subclasses of the
#: expected base class) and the ``memcomp``/``ddp_memcomp`` strategies are in Lightning's registry.
COMPONENT_MODULES = (
    "recipes.classification",
    "recipes.segmentation",
    "lightning_memcomp.compression.callback",
    "lightning_memcomp.memory.monitor",
    "lightning_memcomp.bandlimit.callback",
    "lightning_memcomp.csg.callback",
    "lightning_memcomp.strategies",
)

MiB = 1024 * 1024


def register_components(modules: Sequence[str] = COMPONENT_MODULES) -> list[str]:
    """Import the recipe and callback modules; returns those that are not part of this installation.

    A module that does not exist is skipped (a release may ship without a technique); any other import
    error propagates, so a broken module is never silently hidden.
    """
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
                raise
            missing.append(name)
    return missing


def _named(trainer: Trainer, class_name: str) -> list[Any]:
    return [cb for cb in trainer.callbacks if type(cb).__name__ == class_name]  # type: ignore[attr-defined]


def check_combination(trainer: Trainer) -> None:
    """Refuse callback/strategy combinations that cannot work together (raises ``ValueError``).

    * two ``ActivationCompression`` callbacks, or one together with a ``memcomp`` strategy: both would
      wrap the same training forward in a saved-tensor engine, and engines do not nest;
    * ``BandLimiting`` and ``ConvSliceGeneration`` both on their default selection: both replace the
      same k x k convolutions; give one of them ``modules=`` so they take different layers.
    """
    compressors = _named(trainer, "ActivationCompression")
    if len(compressors) > 1:
        raise ValueError(
            f"{len(compressors)} ActivationCompression callbacks were given; saved-tensor engines do not nest, so "
            "use one (its `modules=` option selects the layers, one codec per run)"
        )
    strategy = trainer.strategy
    if compressors and hasattr(strategy, "memcomp_ledger"):
        raise ValueError(
            f"ActivationCompression callback together with strategy {type(strategy).__name__}, which compresses "
            "activations too: use either the callback or the memcomp strategy, not both"
        )
    band, csg = _named(trainer, "BandLimiting"), _named(trainer, "ConvSliceGeneration")
    if band and csg and getattr(band[0], "modules", None) is None and getattr(csg[0], "modules", None) is None:
        raise ValueError(
            "BandLimiting and ConvSliceGeneration both convert the k x k convolutions by default, so they would "
            "compete for the same layers; give one of them `modules=` (class names or qualified-name globs) so "
            "they select different layers"
        )


def _held_for_backward(trainer: Trainer) -> tuple[float, float, str] | None:
    """Raw and stored bytes held for backward per training step, and where the figure comes from."""
    for cb in _named(trainer, "MemoryMonitor"):
        rows = [r for r in getattr(cb, "history", []) if "memory/held_raw_mib" in r]
        if rows:
            row = max(rows, key=lambda r: r["memory/held_raw_mib"])  # a full batch, not a last partial one
            return row["memory/held_raw_mib"] * MiB, row["memory/held_stored_mib"] * MiB, "MemoryMonitor"
    for source in (*trainer.callbacks, trainer.strategy):  # type: ignore[attr-defined]
        ledger = getattr(source, "memcomp_ledger", None)
        if ledger is not None and ledger.count:
            return float(ledger.raw_bytes), float(ledger.stored_bytes), type(source).__name__
    return None


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def format_summary(trainer: Trainer, test_results: Sequence[dict[str, float]] | None = None) -> str:
    """The end-of-run summary: metrics, held-for-backward bytes raw vs stored, parameters, log directory."""
    lines = ["", "=== memcomp summary ==="]
    metrics: dict[str, float] = {}
    for k, v in trainer.callback_metrics.items():
        if k.startswith("val/"):
            metrics[k] = float(v)
    for result in test_results or []:
        metrics.update({k: float(v) for k, v in result.items()})
    wanted = [k for k in metrics if k.startswith("test/") and not k.endswith("loss")]
    wanted += [k for k in metrics if k.startswith("val/") and not k.endswith("loss")]
    for key in wanted:
        value = metrics[key]
        shown = f"{100 * value:.2f}%" if "acc" in key else _fmt(value)
        lines.append(f"{key:<24}{shown}")
    held = _held_for_backward(trainer)
    if held is not None:
        raw, stored, source = held
        ratio = raw / stored if stored else math.inf
        lines.append(
            f"{'held for backward':<24}raw {raw / MiB:.2f} MiB -> stored {stored / MiB:.2f} MiB "
            f"({ratio:.2f}x smaller; per training step, from {source})"
        )
    model = trainer.lightning_module
    if model is not None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lines.append(f"{'trainable parameters':<24}{trainable:,}")
    ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
        trainer.checkpoint_callback, "best_model_path", ""
    )
    if not ckpt:
        ckpt_dir = getattr(trainer.checkpoint_callback, "dirpath", None)
        ckpt = ckpt_dir if ckpt_dir and Path(ckpt_dir).is_dir() else ""
    if ckpt:
        lines.append(f"{'checkpoint':<24}{ckpt}")
    if trainer.logger is not None and trainer.log_dir:
        lines.append(f"{'logs':<24}{trainer.log_dir}")
        if any(type(lg).__name__ == "TensorBoardLogger" for lg in trainer.loggers):
            root = Path(trainer.log_dir).parent.parent
            lines.append(f"{'view the curves':<24}tensorboard --logdir {root}")
    return "\n".join(lines)


class MemcompCLI(LightningCLI):
    """LightningCLI in subclass mode for models and data, with our components resolvable by short name.

    Adds two options to every subcommand: ``--test_after_fit`` (default true: ``fit`` ends with ``test``
    on the trained weights when the data has a test split) and ``--summary`` (default true: print the
    summary of :func:`format_summary` at the end of ``fit``/``test``). Before running, it refuses
    combinations that cannot work (:func:`check_combination`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        register_components()
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault(
            "parser_kwargs",
            {
                "prog": "memcomp",
                "description": "Train, validate, test or predict with the lightning_memcomp recipes "
                "(LightningCLI). Also: `memcomp bench --help` for the memory/speed benchmark.",
            },
        )
        self.test_results: list[dict[str, float]] | None = None
        self.val_metrics: dict[str, float] = {}
        self.summary_text: str | None = None
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, run test on the trained weights (when the data has a test split).")
        parser.add_argument("--summary", type=bool, default=True,
                            help="Print a summary (metrics, bytes held for backward, log directory) at the end.")

    def _option(self, name: str, default: Any) -> Any:
        return self._get(self.config, name, default)

    def before_instantiate_classes(self) -> None:
        # Lightning itself rejects two callbacks of one stateful class with a generic message when the
        # Trainer is built; say what is wrong before that.
        callbacks = self._get(self.config, "trainer", {}).get("callbacks") or []
        names = [str(getattr(cb, "class_path", "")).rsplit(".", 1)[-1] for cb in callbacks]
        if names.count("ActivationCompression") > 1:
            raise ValueError(
                f"{names.count('ActivationCompression')} ActivationCompression callbacks were given; saved-tensor "
                "engines do not nest, so use one (its `modules=` option selects the layers, one codec per run)"
            )

    def before_fit(self) -> None:
        check_combination(self.trainer)

    def before_validate(self) -> None:
        check_combination(self.trainer)

    def before_test(self) -> None:
        check_combination(self.trainer)

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.interrupted:
            return
        # test replaces callback_metrics: keep the last validation figures for the summary
        self.val_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if self._option("test_after_fit", True) and self._has_test_split():
            self.test_results = trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        self._print_summary()

    def after_test(self) -> None:
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")}
        self.test_results = [metrics] if metrics else None
        self._print_summary()

    def _has_test_split(self) -> bool:
        dm = self.datamodule
        if dm is None:
            return type(self.model).test_step is not LightningModule.test_step
        return type(dm).test_dataloader is not LightningDataModule.test_dataloader

    def _print_summary(self) -> None:
        results = [self.val_metrics, *(self.test_results or [])] if self.val_metrics else self.test_results
        self.summary_text = format_summary(self.trainer, results)
        if self._option("summary", True):
            _print(self.summary_text)


@rank_zero_only
def _print(text: str) -> None:
    print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memcomp`` console script.

    ``memcomp bench ...`` runs :func:`lightning_memcomp.bench.main`, ``memcomp kernels ...``
    :func:`lightning_memcomp.kernels.main` (``--build``, ``--list``); everything else is :class:`MemcompCLI`.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "kernels":
        from lightning_memcomp import kernels

        return kernels.main(args[1:])
    if args and args[0] == "bench":
        try:
            bench = importlib.import_module("lightning_memcomp.bench")
        except ModuleNotFoundError as err:
            if err.name != "lightning_memcomp.bench":
                raise
            print("memcomp bench: the benchmark (lightning_memcomp.bench) is not part of this installation",
                  file=sys.stderr)
            return 2
        return int(bench.main(args[1:]) or 0)
    # from the console script LightningCLI reads sys.argv itself (passing both makes it warn)
    MemcompCLI(args=None if argv is None else args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
