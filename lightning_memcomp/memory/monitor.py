"""``MemoryMonitor``: per-step memory curves of a training run, for TensorBoard and as a CSV."""

from __future__ import annotations

import csv
import itertools
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from typing_extensions import override

from lightning_memcomp import _lightning as pl
from lightning_memcomp._lightning import Callback, TensorBoardLoggers
from lightning_memcomp.memory.engine import DEFAULT_MIN_BYTES, SavedTensorEngine, track_saved_tensors
from lightning_memcomp.memory.ledger import Ledger, MiB
from lightning_memcomp.memory.readings import NVMLReader, cuda_counters, peak_rss, process_rss, reset_peak_rss

__all__ = ["KEYS", "PROG_BAR_NAMES", "MemoryMonitor", "memory_figure"]

#: Every key MemoryMonitor may log, with its meaning. Sizes are MiB; counts are plain numbers.
KEYS: dict[str, str] = {
    "memory/held_raw_mib": "bytes the forward pass saved for backward, at their dense size (ledger)",
    "memory/held_stored_mib": "bytes actually kept for backward after encoding (ledger)",
    "memory/held_ratio": "held_raw / held_stored (1.0 without compression)",
    "memory/held_uncompressed_mib": "bytes saved for backward that were left as they are (small, not floating, "
    "not selected, declined by the codec): the ledger's passthrough bytes; by reason in ledger.left_as_is()",
    "memory/rss_mib": "process resident set size at the end of the step (CPU runs)",
    "memory/rss_forward_delta_mib": "RSS growth across the forward pass (CPU runs); can be negative, when the "
    "allocator hands freed memory back to the operating system during the forward",
    "memory/alloc_before_forward_mib": "torch.cuda.memory_allocated() right before the forward pass",
    "memory/alloc_after_forward_mib": "torch.cuda.memory_allocated() right after the forward pass",
    "memory/forward_delta_mib": "after-forward minus before-forward allocated: what the forward leaves alive",
    "memory/alloc_after_backward_mib": "allocated right after backward",
    "memory/alloc_after_step_mib": "allocated after the optimizer step",
    "memory/peak_mib": "the step's peak: torch.cuda.max_memory_allocated() on CUDA; on CPU the process's peak "
    "resident set (VmHWM, Linux), both reset at step start",
    "memory/reserved_mib": "bytes reserved by the caching allocator",
    "memory/reserved_unused_mib": "reserved minus allocated (fragmentation and cache)",
    "memory/alloc_retries": "cumulative cudaMalloc retries after freeing the cache",
    "memory/oom_count": "cumulative out-of-memory errors seen by the allocator",
    "memory/nvml_used_mib": "device memory in use as NVML reports it (all processes)",
    "time/step_s": "wall seconds of a training step (on_train_batch_start to on_train_batch_end, CUDA-synchronised "
    "at its end): the median of the steps since the previous log on which the monitor did not log (those are "
    "slower: it resets the peak counters and may track saved tensors itself), or that logged step's own time "
    "when every step is logged (every_n_steps=1)",
    "model/trainable_params": "trainable parameters of the LightningModule, logged once at train start",
}

#: TensorBoard custom-scalars layout: chart title -> the keys on it (raw key names, as TensorBoard shows them).
_PANELS: dict[str, list[str]] = {
    "step peak (MiB)": ["memory/peak_mib"],
    "held for backward (MiB)": ["memory/held_raw_mib", "memory/held_stored_mib"],
    "CUDA allocated (MiB)": [
        "memory/alloc_before_forward_mib",
        "memory/alloc_after_forward_mib",
        "memory/alloc_after_backward_mib",
        "memory/alloc_after_step_mib",
        "memory/reserved_mib",
        "memory/nvml_used_mib",
    ],
    "process RSS (MiB)": ["memory/rss_mib", "memory/rss_forward_delta_mib"],
    "step time (s)": ["time/step_s"],
}

#: Progress-bar names of the keys shown with ``prog_bar=True``.
PROG_BAR_NAMES: dict[str, str] = {"memory/peak_mib": "peak_mib", "memory/held_ratio": "held_x"}


def _figure_panels(device_kind: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """The panels of :func:`memory_figure`: (title, y-axis label, [(key, legend label)]), for ``"cpu"``/``"cuda"``."""
    cuda = device_kind == "cuda"
    peak = "step peak (max allocated)" if cuda else "step peak (VmHWM, whole process)"
    if cuda:
        totals = (
            "CUDA allocator totals",
            [
                ("memory/alloc_before_forward_mib", "allocated before forward"),
                ("memory/alloc_after_forward_mib", "allocated after forward"),
                ("memory/alloc_after_backward_mib", "allocated after backward"),
                ("memory/alloc_after_step_mib", "allocated after optimizer step"),
                ("memory/reserved_mib", "reserved by the caching allocator"),
                ("memory/nvml_used_mib", "device memory in use (NVML, all processes)"),
            ],
        )
    else:
        # memory/rss_forward_delta_mib stays out of the figure: it goes negative whenever the allocator returns
        # memory to the OS during the forward, and what it approximates is drawn exactly in the held panel
        totals = ("Process totals", [("memory/rss_mib", "RSS at step end")])
    return [
        ("Step peak", "memory (MiB)", [("memory/peak_mib", peak)]),
        (
            "Held for backward per step",
            "memory (MiB)",
            [
                ("memory/held_raw_mib", "held for backward, dense (raw)"),
                ("memory/held_stored_mib", "held for backward, stored"),
            ],
        ),
        (totals[0], "memory (MiB)", totals[1]),
        ("Training step time", "time (s)", [("time/step_s", "step time")]),
    ]


def _mib(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def memory_figure(history: list[dict[str, float]], device_kind: str = "cpu") -> Any:
    """A matplotlib figure of MemoryMonitor's curves: one panel per kind of figure, readable labels with units.

    Panels, each drawn only when ``history`` has its keys: the step peak, the bytes held for backward
    (dense and stored), the process (CPU) or caching-allocator (CUDA) totals, and the step time. The raw
    keys stay what TensorBoard and the CSV use; the figure shows them by name (see :data:`KEYS`).

    Args:
        history: rows as in :attr:`MemoryMonitor.history` (``"step"`` and any keys of :data:`KEYS`).
        device_kind: ``"cuda"`` or ``"cpu"``: which reading the step peak is, and which totals are drawn.

    Returns:
        The figure, or ``None`` when ``history`` has none of the drawn keys.
    """
    import matplotlib

    if os.environ.get("MPLBACKEND") is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = []
    for title, ylabel, series in _figure_panels(device_kind):
        present = [(key, label) for key, label in series if any(key in row for row in history)]
        if present:
            panels.append((title, ylabel, present))
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels) + 0.6), sharex=True, squeeze=False)
    for ax, (title, ylabel, series) in zip(axes[:, 0], panels):
        for key, label in series:
            points = [(row["step"], row[key]) for row in history if key in row]
            if key == "time/step_s":
                steps = [step for step, _ in points]
                every_step = all(b - a == 1 for a, b in itertools.pairwise(steps))
                label += " (every step logged)" if every_step else " (median of the steps between logs)"
            style = "--" if key == "memory/held_raw_mib" else "-"  # visible under "stored" when nothing is compressed
            ax.plot(*zip(*points), style, label=label, marker="o" if len(points) <= 30 else None, markersize=3)
        if title.startswith("Held"):
            ax.set_ylim(bottom=0)
            full = max((row for row in history if "memory/held_raw_mib" in row), key=lambda r: r["memory/held_raw_mib"],
                       default=None)
            if full is not None and full.get("memory/held_stored_mib"):
                raw, stored = full["memory/held_raw_mib"], full["memory/held_stored_mib"]
                title += f" (largest: {_mib(raw)} MiB dense -> {_mib(stored)} MiB stored, {raw / stored:.2f}x)"
        elif ylabel.startswith("time"):
            ax.set_ylim(bottom=0)
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        ax.set_title(title, fontsize="medium")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    axes[-1, 0].set_xlabel("training step")
    params = next((row["model/trainable_params"] for row in history if "model/trainable_params" in row), None)
    heading = f"MemoryMonitor, {'CUDA' if device_kind == 'cuda' else 'CPU'} run"
    if params is not None:
        heading += f", {int(params):,} trainable parameters"
    fig.suptitle(heading)
    fig.tight_layout()
    return fig


class MemoryMonitor(Callback):
    """Log memory per training step: held-for-backward bytes, CUDA allocator figures, NVML, RSS.

    Every ``every_n_steps`` training steps it logs the keys in :data:`KEYS` that apply to the device
    (the ``memory/held_*`` keys everywhere, CUDA and NVML keys on GPU, RSS keys on CPU), as the maximum
    over ranks, from rank 0. With a TensorBoard logger it also writes a custom-scalars layout (the
    curves grouped on charts), the per-module table of held-for-backward bytes at the first logged
    step (text), and at the end of fit a figure of the curves; the series go to ``memory_log.csv``,
    the figure to ``memory_curves.png`` and the table to ``memory_by_module.md`` in the log directory.

    Held-for-backward bytes come from the ledger of an :class:`~lightning_memcomp.ActivationCompression`
    callback or ``memcomp`` strategy when one is present; otherwise the monitor tracks saved tensors
    itself (identity codec, only on logged steps).

    It also times every training step (``time/step_s``: the median of the steps between logs, which the
    monitor does not instrument) and logs the trainable parameter count once at train start
    (``model/trainable_params``). It never logs hyperparameters; TensorBoard's ``hp_metric`` placeholder
    comes from ``TensorBoardLogger(default_hp_metric=True)``, Lightning's default.

    Args:
        every_n_steps: log every this many training steps.
        held_for_backward: account saved tensors (the ledger) on logged steps.
        min_bytes: tensors smaller than this are counted as passthrough by the ledger.
        module_table_rows: rows of the per-module table (0 disables it).
        snapshot_steps: ``(start, stop)`` global steps between which to record a CUDA memory history,
            dumped to ``memory_snapshot_<start>_<stop>.pickle`` (open it at pytorch.org/memory_viz).
        snapshot_on_oom: record the CUDA memory history from the start of training and dump
            ``oom_snapshot.pickle`` when a CUDA out-of-memory error ends the fit.
        snapshot_max_entries: allocation events kept in the recorded history.
        write_files: write the CSV, the figure and the module table into the log directory (only when
            the trainer has a logger: with ``logger=False`` or ``fast_dev_run`` the series stay in
            :attr:`history`).
        prog_bar: also show the step peak and the held ratio in Lightning's progress bar, as ``peak_mib``
            and ``held_x`` (see :data:`PROG_BAR_NAMES`), updated on logged steps.

    Raises:
        ValueError: non-positive ``every_n_steps``, or a ``snapshot_steps`` window that is not
            ``(start, stop)`` with ``0 <= start < stop``.

    Example::

        trainer = Trainer(callbacks=[MemoryMonitor(every_n_steps=10, prog_bar=True)],
                          logger=TensorBoardLogger("logs", default_hp_metric=False))
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        held_for_backward: bool = True,
        min_bytes: int = DEFAULT_MIN_BYTES,
        module_table_rows: int = 30,
        snapshot_steps: tuple[int, int] | None = None,
        snapshot_on_oom: bool = False,
        snapshot_max_entries: int = 100_000,
        write_files: bool = True,
        prog_bar: bool = False,
    ) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be a positive integer")
        if snapshot_steps is not None:
            if len(snapshot_steps) != 2 or not 0 <= snapshot_steps[0] < snapshot_steps[1]:
                raise ValueError(f"snapshot_steps={snapshot_steps!r} must be (start, stop) with 0 <= start < stop")
            snapshot_steps = (int(snapshot_steps[0]), int(snapshot_steps[1]))
        self.every_n_steps = every_n_steps
        self.held_for_backward = held_for_backward
        self.min_bytes = min_bytes
        self.module_table_rows = module_table_rows
        self.snapshot_steps = snapshot_steps
        self.snapshot_on_oom = snapshot_on_oom
        self.snapshot_max_entries = snapshot_max_entries
        self.write_files = write_files
        self.prog_bar = prog_bar
        self.history: list[dict[str, float]] = []
        self._engine: SavedTensorEngine | None = None
        self._provider: Any = None
        self._nvml: NVMLReader | None = None
        self._cuda = False
        self._peak_rss = os.access("/proc/self/clear_refs", os.W_OK)  # VmHWM can be reset (Linux)
        self._device: torch.device | None = None
        self._step_values: dict[str, float] = {}
        self._logging = False
        self._table_written = False
        self._layout_written = False
        self._recording = False
        self._files_written = False
        self._dir: Path | None = None
        self._step_start = 0.0
        self._step_times: list[float] = []  # seconds of the unlogged steps since the last log
        self._synced = False  # CUDA: the queue was drained at the end of the previous training step
        self._once: dict[str, float] = {}  # logged at train start, joins the next history row
        self._params_pending = False

    # -- setup -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._device = pl_module.device
        self._cuda = self._device.type == "cuda"
        candidates = [cb for cb in trainer.callbacks if cb is not self] + [trainer.strategy]  # type: ignore[attr-defined]
        self._provider = next((c for c in candidates if hasattr(c, "memcomp_ledger")), None)
        if self._provider is None and self.held_for_backward and self._engine is None:
            self._engine = track_saved_tensors(pl_module, min_bytes=self.min_bytes)
        if self._cuda and self._nvml is None:
            self._nvml = NVMLReader(self._device)
        if not self._cuda and (self.snapshot_steps or self.snapshot_on_oom):
            warnings.warn(
                "MemoryMonitor: snapshot_steps/snapshot_on_oom record CUDA allocator history; this run is on "
                f"{self._device}, so no snapshot will be written",
                stacklevel=2,
            )

    def _log_params(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``model/trainable_params`` once; with lazy modules (``nn.LazyLinear``) not yet initialised, after the
        first training batch instead."""
        parameters = [p for p in pl_module.parameters() if p.requires_grad]
        self._params_pending = any(isinstance(p, torch.nn.parameter.UninitializedTensorMixin) for p in parameters)
        if self._params_pending:
            return
        if trainer.is_global_zero:
            self._once = {"model/trainable_params": float(sum(p.numel() for p in parameters))}
            for logger in trainer.loggers:
                logger.log_metrics(self._once, step=trainer.global_step)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Trainer.log_dir broadcasts from rank 0: resolve it here, where every rank calls it
        self._dir = Path(trainer.log_dir or trainer.default_root_dir)
        if self._cuda and self.snapshot_on_oom:
            self._start_recording()
        self._synced = False
        self._log_params(trainer, pl_module)
        if trainer.is_global_zero and not self._layout_written:
            keys = self._device_keys()
            layout = {
                "memory": {
                    title: ["Multiline", [k for k in panel if k in keys]]
                    for title, panel in _PANELS.items()
                    if any(k in keys for k in panel)
                }
            }
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLoggers):
                    logger.experiment.add_custom_scalars(layout)
            self._layout_written = True

    def _device_keys(self) -> set[str]:
        keys = {"memory/held_raw_mib", "memory/held_stored_mib", "memory/held_ratio", "memory/held_uncompressed_mib"}
        if self._cuda:
            keys |= {k for k in KEYS if not k.startswith("memory/rss") and not k.startswith("memory/held")}
        else:
            keys |= {"memory/rss_mib", "memory/rss_forward_delta_mib"}
            if self._peak_rss:
                keys.add("memory/peak_mib")
        return keys | {"time/step_s"}

    # -- the step --------------------------------------------------------------------------------
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._synced = False

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._synced = False  # the next training step starts after validation's queued work

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._cuda and self.snapshot_steps and step == self.snapshot_steps[0] and not self._recording:
            self._start_recording()
        self._logging = step % self.every_n_steps == 0
        if self._cuda and not self._synced:  # only after work of other loops (validation, first step)
            torch.cuda.synchronize(self._device)
        self._step_start = time.perf_counter()
        if not self._logging:
            return
        self._step_values = {"step": float(step)}
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self._device)
            self._step_values["memory/alloc_before_forward_mib"] = torch.cuda.memory_allocated(self._device) / MiB
        else:
            self._peak_rss = reset_peak_rss()
            self._rss_before = process_rss()
        if self._engine is not None and not self._engine.active:
            self._engine.start()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not self._logging or "memory/held_raw_mib" in self._step_values:
            return
        if self._engine is not None and self._engine.active:
            self._engine.stop()
        values = self._step_values
        if self._cuda:
            after = torch.cuda.memory_allocated(self._device) / MiB
            values["memory/alloc_after_forward_mib"] = after
            values["memory/forward_delta_mib"] = after - values["memory/alloc_before_forward_mib"]
        else:
            values["memory/rss_forward_delta_mib"] = (process_rss() - self._rss_before) / MiB
        ledger = self._ledger()
        if ledger is not None:
            values["memory/held_raw_mib"] = ledger.raw_bytes / MiB
            values["memory/held_stored_mib"] = ledger.stored_bytes / MiB
            values["memory/held_ratio"] = ledger.ratio
            values["memory/held_uncompressed_mib"] = ledger.passthrough_bytes / MiB
            if not self._table_written and self.module_table_rows and trainer.is_global_zero:
                self._write_table(trainer, ledger)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._logging and self._cuda:
            self._step_values["memory/alloc_after_backward_mib"] = torch.cuda.memory_allocated(self._device) / MiB

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._cuda:
            torch.cuda.synchronize(self._device)
            self._synced = True
        seconds = time.perf_counter() - self._step_start
        if self._engine is not None and self._engine.active:  # the step skipped backward
            self._engine.stop()
        if self._params_pending:  # lazy modules are initialised by now
            self._log_params(trainer, pl_module)
        if self._logging:
            times, self._step_times = self._step_times, []
            self._step_values["time/step_s"] = statistics.median(times) if times else seconds
            self._finish_step(trainer, pl_module)
        else:
            self._step_times.append(seconds)
        if (
            self._cuda
            and self.snapshot_steps
            and self._recording
            and trainer.global_step >= self.snapshot_steps[1]
            and not self.snapshot_on_oom
        ):
            start, stop = self.snapshot_steps
            self._dump_snapshot(trainer, f"memory_snapshot_{start}_{stop}.pickle")
            self._stop_recording()
        self._logging = False

    def _finish_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values = self._step_values
        step = int(values.pop("step"))
        if self._cuda:
            values["memory/alloc_after_step_mib"] = torch.cuda.memory_allocated(self._device) / MiB
            values["memory/peak_mib"] = torch.cuda.max_memory_allocated(self._device) / MiB
            values.update(cuda_counters(self._device))
            used = self._nvml.used_mib() if self._nvml is not None else None
            if used is not None:
                values["memory/nvml_used_mib"] = used
        else:
            values["memory/rss_mib"] = process_rss() / MiB
            peak = peak_rss() if self._peak_rss else None
            if peak is not None:
                values["memory/peak_mib"] = peak / MiB
        keys = sorted(values)
        if trainer.world_size > 1:
            reduced = trainer.strategy.reduce(
                torch.tensor([values[k] for k in keys], dtype=torch.float64, device=pl_module.device), reduce_op="max"
            )
            values = dict(zip(keys, reduced.tolist()))
        else:
            values = {k: values[k] for k in keys}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)
            self.history.append({"step": float(step), **values, **self._once})
            self._once = {}
        if self.prog_bar:
            for key, name in PROG_BAR_NAMES.items():
                if key in values:
                    pl_module.log(name, values[key], prog_bar=True, logger=False, on_step=True, on_epoch=False,
                                  batch_size=1)

    def _ledger(self) -> Ledger | None:
        if self._provider is not None:
            return self._provider.memcomp_ledger
        return self._engine.ledger if self._engine is not None else None

    # -- outputs ---------------------------------------------------------------------------------
    def _log_dir(self, trainer: pl.Trainer) -> Path:
        path = self._dir if self._dir is not None else Path(trainer.default_root_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _writes_files(self, trainer: pl.Trainer) -> bool:
        # like Lightning's own outputs: nothing is written without a logger (logger=False, fast_dev_run)
        return self.write_files and bool(trainer.loggers)

    def _write_table(self, trainer: pl.Trainer, ledger: Ledger) -> None:
        table = ledger.table(top=self.module_table_rows)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLoggers):
                logger.experiment.add_text("memory/held_by_module", table, global_step=trainer.global_step)
        if self._writes_files(trainer):
            (self._log_dir(trainer) / "memory_by_module.md").write_text(table + "\n")
        self._table_written = True

    def _write_files(self, trainer: pl.Trainer) -> None:
        if self._files_written or not trainer.is_global_zero or not self.history:
            return
        self._files_written = True
        columns = ["step", *sorted({k for row in self.history for k in row} - {"step"})]
        if self._writes_files(trainer):
            with open(self._log_dir(trainer) / "memory_log.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                for row in self.history:
                    writer.writerow({k: row.get(k, "") for k in columns})
        figure = self._figure()
        if figure is None:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLoggers):
                logger.experiment.add_figure("memory/curves", figure, global_step=trainer.global_step, close=False)
                logger.experiment.flush()
        if self._writes_files(trainer):
            figure.savefig(self._log_dir(trainer) / "memory_curves.png", dpi=100)
        import matplotlib.pyplot as plt

        plt.close(figure)

    def _figure(self) -> Any:
        return memory_figure(self.history, "cuda" if self._cuda else "cpu")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_files(trainer)
        if self._recording and not self.snapshot_on_oom:
            self._stop_recording()

    # -- snapshots and failures ------------------------------------------------------------------
    def _start_recording(self) -> None:
        torch.cuda.memory._record_memory_history(max_entries=self.snapshot_max_entries)
        self._recording = True

    def _stop_recording(self) -> None:
        torch.cuda.memory._record_memory_history(enabled=None)
        self._recording = False

    def _dump_snapshot(self, trainer: pl.Trainer, name: str) -> Path:
        rank = trainer.global_rank
        path = self._log_dir(trainer) / (name if rank == 0 else name.replace(".pickle", f"_rank{rank}.pickle"))
        torch.cuda.memory._dump_snapshot(str(path))
        return path

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._engine is not None and self._engine.active:
            self._engine.stop()
        if self._recording and isinstance(exception, torch.cuda.OutOfMemoryError) and self.snapshot_on_oom:
            path = self._dump_snapshot(trainer, "oom_snapshot.pickle")
            warnings.warn(f"MemoryMonitor: CUDA out of memory; allocator history written to {path}", stacklevel=2)
        if self._recording:
            self._stop_recording()
        self._write_files(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._engine is not None and self._engine.active:
            self._engine.stop()
