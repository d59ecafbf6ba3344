"""The ``memcomp`` command: LightningCLI over the shipped recipes, with every callback of ours by short name.

::

    memcomp fit --config digits_quant4                     # a shipped config by name: train, test, summarize
    memcomp fit --config digits_baseline --technique csg+quant:4 --trainer.max_epochs=3
    memcomp fit --config my_run.yaml                       # a path works too
    memcomp test --config digits_quant4 --ckpt_path path/to/last.ckpt
    memcomp configs                                        # the shipped configs
    memcomp compare memcomp_logs                           # runs side by side: memory, time, accuracy
    memcomp plan --config digits_baseline --budget 4GiB    # the largest batch each technique fits
    memcomp bench ...                                      # the benchmark (lightning_memcomp.bench)
    memcomp kernels --build                                # compile the C++/CUDA kernels

Models and data are given in subclass mode (``class_path: ImageClassifier``, ``class_path:
DigitsDataModule``; any LightningModule/LightningDataModule by full import path also works). Our
callbacks (``ActivationCompression``, ``MemoryMonitor``, ``BandLimiting``, ``ConvSliceGeneration``) and
strategies (``memcomp``, ``ddp_memcomp``) resolve by short name because this module imports them before
parsing. ``--technique`` replaces the config's technique callbacks by the ones a method spec names
(:mod:`lightning_memcomp.techniques`). After ``fit`` the command runs ``test`` on the trained weights
(``--test_after_fit=false`` to skip) and prints a summary: test metrics, bytes held for backward raw vs stored,
and where the logs are.

Our own errors (a bad option value, a refused combination, missing data or dependency) print as one short
message and exit with status 2; ``--debug`` (or ``MEMCOMP_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from lightning_memcomp.short_errors import debug_requested, short_message
from lightning_memcomp.techniques import apply_technique, parse_technique, run_name, technique_help

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
    "lightning_memcomp.recompute",
    "lightning_memcomp.plan",
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


def combination_problem(callbacks: Sequence[tuple[str, Any]], compressing_strategy: str | None) -> str | None:
    """Why a set of callbacks and a strategy cannot work together, or ``None`` when they can.

    ``callbacks`` are ``(class name, its modules= selection)`` pairs; ``compressing_strategy`` names the
    strategy when it compresses activations itself (``memcomp``, ``ddp_memcomp``), else ``None``. The rules
    are those of :func:`check_combination`.
    """
    names = [name for name, _ in callbacks]
    compressors = names.count("ActivationCompression")
    if compressors > 1:
        return (f"{compressors} ActivationCompression callbacks were given; saved-tensor engines do not nest, so "
                "use one (its `modules=` option selects the layers; --technique replaces the config's)")
    if compressors and compressing_strategy:
        return (f"ActivationCompression callback together with strategy {compressing_strategy}, which compresses "
                "activations too: use either the callback or the memcomp strategy, not both")
    modules = dict(callbacks)
    if "BandLimiting" in modules and "ConvSliceGeneration" in modules and modules["BandLimiting"] is None \
            and modules["ConvSliceGeneration"] is None:
        return ("BandLimiting and ConvSliceGeneration both convert the k x k convolutions by default, so they would "
                "compete for the same layers; give one of them `modules=` (class names or qualified-name globs) so "
                "they select different layers")
    return None


_COMPRESSING_STRATEGIES = ("memcomp", "ddp_memcomp", "MemCompSingleDeviceStrategy", "DDPMemCompStrategy")


def check_combination(trainer: Trainer) -> None:
    """Refuse callback/strategy combinations that cannot work together (raises ``ValueError``).

    * two ``ActivationCompression`` callbacks, or one together with a ``memcomp`` strategy: both would
      wrap the same training forward in a saved-tensor engine, and engines do not nest;
    * ``BandLimiting`` and ``ConvSliceGeneration`` both on their default selection: both replace the
      same k x k convolutions; give one of them ``modules=`` so they take different layers.

    ``memcomp`` applies the same rules to the parsed config, before anything is built.
    """
    callbacks = [(type(cb).__name__, getattr(cb, "modules", None))
                 for cb in trainer.callbacks]  # type: ignore[attr-defined]
    strategy = type(trainer.strategy).__name__ if hasattr(trainer.strategy, "memcomp_ledger") else None
    problem = combination_problem(callbacks, strategy)
    if problem:
        raise ValueError(problem)


def _config_combination(config: Any) -> str | None:
    """:func:`combination_problem` of a parsed LightningCLI config (a subcommand's namespace)."""
    trainer = config.get("trainer") or {}
    entries = trainer.get("callbacks") or []
    entries = entries if isinstance(entries, list) else [entries]
    callbacks = []
    for entry in entries:
        name = str(entry.get("class_path", "") if hasattr(entry, "get") else "").rsplit(".", 1)[-1]
        init = entry.get("init_args") if hasattr(entry, "get") else None
        callbacks.append((name, init.get("modules") if init is not None and hasattr(init, "get") else None))
    strategy = trainer.get("strategy")
    if strategy is not None and not isinstance(strategy, str):
        strategy = str(strategy.get("class_path", "") if hasattr(strategy, "get") else type(strategy).__name__)
        strategy = strategy.rsplit(".", 1)[-1]
    return combination_problem(callbacks, strategy if strategy in _COMPRESSING_STRATEGIES else None)


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
                "(LightningCLI): memcomp fit --config NAME [--technique SPEC]. Also: memcomp configs (the "
                "shipped configs), memcomp compare RUN_DIR... (runs side by side), memcomp plan --config NAME "
                "(the largest batch each technique fits), memcomp bench --help (the memory/speed benchmark), "
                "memcomp kernels --build.",
            },
        )
        self.test_results: list[dict[str, float]] | None = None
        self.val_metrics: dict[str, float] = {}
        self.summary_text: str | None = None
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # parse errors are raised, not printed with the whole usage: `main` prints them short (see --debug)
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--technique", type=Optional[str], default=None,
                            help="Replace the config's technique callbacks (ActivationCompression, BandLimiting, "
                                 "ConvSliceGeneration, ActivationCheckpointing) by the ones this names, and name the "
                                 f"run after it: {technique_help()}.")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, run test on the trained weights (when the data has a test split).")
        parser.add_argument("--summary", type=bool, default=True,
                            help="Print a summary (metrics, bytes held for backward, log directory) at the end.")

    def _option(self, name: str, default: Any) -> Any:
        return self._get(self.config, name, default)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if config.get("technique"):
            config = self._with_technique(config, subcommand)
            if subcommand:
                self.config[subcommand] = config
            else:
                self.config = config
        # refuse what cannot work before anything is built (and before Lightning prints its banner)
        problem = _config_combination(config)
        if problem:
            raise ValueError(problem)

    def _with_technique(self, config: Any, subcommand: str | None) -> Any:
        """``config`` with its technique callbacks replaced by those of ``--technique`` (and the run renamed)."""
        spec = config.technique
        technique = parse_technique(spec)
        config = config.clone()
        trainer = config.trainer
        strategy = trainer.get("strategy")
        strategy_name = strategy if isinstance(strategy, str) else str(getattr(strategy, "class_path", ""))
        if strategy_name.rsplit(".", 1)[-1] in _COMPRESSING_STRATEGIES and any(
            "ActivationCompression" in cb["class_path"] for cb in technique.callbacks
        ):
            raise ValueError(
                f"--technique={spec!r} compresses activations and --trainer.strategy={strategy_name} does too; use "
                "--trainer.strategy=auto (or ddp) with --technique, or leave --technique out"
            )
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        entries = [cb.as_dict() if hasattr(cb, "as_dict") else cb for cb in callbacks]
        update: dict[str, Any] = {"callbacks": apply_technique(entries, technique)}
        if technique.precision:
            update["precision"] = technique.precision
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init = getattr(logger, "init_args", None)
            if init is not None and isinstance(init.get("name"), str):
                init.name = run_name(init.name, technique)
        trainer.callbacks = None  # replaced, not merged entry by entry with the config's list
        config = self._parser(subcommand).parse_object({"trainer": update}, namespace=config)
        config.technique = technique.spec
        return config

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # missing data is the user's to fix: say so before the Trainer is built (and prints its banner)
        check = getattr(self.datamodule, "check_data", None)
        if self.subcommand is not None and callable(check):
            check()
        return super().instantiate_trainer(**kwargs)

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
    """Entry point of the ``memcomp`` console script; returns the exit status.

    ``memcomp bench ...`` runs :func:`lightning_memcomp.bench.main`, ``memcomp kernels ...``
    :func:`lightning_memcomp.kernels.main` (``--build``, ``--list``), ``memcomp configs`` lists the shipped
    configs, ``memcomp compare RUN_DIR...`` compares runs; everything else is :class:`MemcompCLI`, with
    ``--config NAME`` resolved among the shipped configs. A user's mistake prints one short message and
    returns 2; ``--debug`` (or ``MEMCOMP_DEBUG=1``) raises it with its traceback instead.
    """
    args, debug = debug_requested(list(sys.argv[1:] if argv is None else argv))
    try:
        return _dispatch(args, from_console=argv is None)
    except Exception as err:
        message = None if debug else short_message(err, args)
        if message is None:
            raise
        _print_error(message)
        return 2


def _print_error(message: str) -> None:
    print(f"memcomp: error: {message}", file=sys.stderr)
    print("(memcomp --debug ... or MEMCOMP_DEBUG=1 shows the traceback)", file=sys.stderr, flush=True)


def _dispatch(args: list[str], from_console: bool) -> int:
    command = args[0] if args else ""
    if command == "kernels":
        from lightning_memcomp import kernels

        return kernels.main(args[1:])
    if command == "configs":
        from lightning_memcomp import configs

        return configs.main(args[1:])
    if command == "compare":
        from lightning_memcomp import compare

        return int(compare.main(args[1:]) or 0)
    if command == "plan":
        from lightning_memcomp import plan

        return plan.main(args[1:])
    if command == "bench":
        try:
            bench = importlib.import_module("lightning_memcomp.bench")
        except ModuleNotFoundError as err:
            if err.name != "lightning_memcomp.bench":
                raise
            print("memcomp bench: the benchmark (lightning_memcomp.bench) is not part of this installation",
                  file=sys.stderr)
            return 2
        return int(bench.main(args[1:]) or 0)
    from lightning_memcomp.configs import resolve_config_args

    args = resolve_config_args(args)
    if from_console:  # LightningCLI reads sys.argv itself when run from the console script (both: it warns)
        sys.argv[1:] = args
        MemcompCLI(args=None)
    else:
        MemcompCLI(args=args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
