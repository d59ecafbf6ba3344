"""``memcomp compare``: several training runs side by side: memory, step time, accuracy or Dice, parameters.

::

    memcomp compare memcomp_logs/digits_baseline/version_0 memcomp_logs/digits_quant4/version_0
    memcomp compare memcomp_logs                       # every run under it
    memcomp compare memcomp_logs/digits_quant4 --out results/quant4 --metric val/acc

A RUN_DIR is the TensorBoard log directory of one run as Lightning writes it (``events.out.tfevents.*``,
``hparams.yaml``, LightningCLI's ``config.yaml``, :class:`~lightning_memcomp.MemoryMonitor`'s
``memory_log.csv``); a folder above run directories stands for all the runs under it. The command prints
one table, one row per run, then each run's step peak, stored bytes and step time relative to a reference
run (the first run whose technique is ``baseline``, else the first run), and writes the table as a CSV and
a bar chart beside it (``--out``; ``memcomp_compare.csv`` and ``memcomp_compare.png`` by default).

The figures, from the scalars in the event files (the CSV fills in keys the events lack):

* step peak: the largest ``memory/peak_mib`` of the run (the process's peak resident set, VmHWM, on CPU;
  ``torch.cuda.max_memory_allocated`` on CUDA; the table's header says which);
* held for backward: ``memory/held_raw_mib`` and ``memory/held_stored_mib`` at the step with the largest
  dense size (a full batch, not a last partial one), and their ratio;
* step time: the median of ``time/step_s``, leaving out the first logged step (warm-up) when there are others;
* accuracy or Dice: the last value of a ``test/`` key (else ``val/``) containing ``acc`` or ``dice``
  (``--metric`` names one); accuracy is shown in %;
* trainable parameters: ``model/trainable_params``.

A figure a run lacks shows as ``-``. The technique is ``config.yaml``'s ``technique`` entry when set,
otherwise derived from its callbacks, strategy and precision (``quant:4``, ``csg+quant:4``,
``quant:4 (strategy)``, ``bf16``, ``baseline``), or the run's name without a ``config.yaml``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_memcomp.short_errors import ShortArgumentParser
from lightning_memcomp.techniques import technique_of

__all__ = ["RunSummary", "build_parser", "compare", "compare_figure", "find_runs", "format_table", "main",
           "read_scalars", "summarize_run", "write_csv"]

EVENTS_GLOB = "events.out.tfevents.*"
PROG = "memcomp compare"

_PEAK_READING = {"cpu": "VmHWM", "cuda": "max allocated"}

Scalars = dict[str, list[tuple[int, float]]]


@dataclass
class RunSummary:
    """One row of the table: a run's figures (``None`` where the run has not logged them)."""

    run: str
    path: Path
    technique: str
    device: str | None = None  #: "cuda" or "cpu" (from the keys MemoryMonitor logged)
    peak_mib: float | None = None
    held_raw_mib: float | None = None
    held_stored_mib: float | None = None
    held_ratio: float | None = None
    step_s: float | None = None
    metric: str | None = None
    metric_value: float | None = None
    trainable_params: int | None = None

    @property
    def peak_reading(self) -> str | None:
        """Which reading the step peak is: ``"VmHWM"`` (CPU) or ``"max allocated"`` (CUDA)."""
        return _PEAK_READING.get(self.device or "") if self.peak_mib is not None else None


# -- finding runs -------------------------------------------------------------------------------------


def _natural(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _is_run(path: Path) -> bool:
    return any(p.is_file() for p in path.glob(EVENTS_GLOB))


def find_runs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The run directories named by ``paths``: each a run directory (with event files) or a folder above run
    directories (expanded to those under it, in natural order: ``version_2`` before ``version_10``).

    Raises:
        ValueError: a path that does not exist, or holds no run.
    """
    if not paths:
        raise ValueError("RUN_DIR: give at least one run directory (a TensorBoard log directory of a run)")
    runs: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ValueError(
                f"RUN_DIR {str(raw)!r} does not exist; expected a run's TensorBoard log directory "
                f"(e.g. memcomp_logs/digits_baseline/version_0) or a folder above run directories"
            )
        if path.is_file():
            if not path.name.startswith("events.out.tfevents."):
                raise ValueError(f"RUN_DIR {str(raw)!r} is a file; expected a run's TensorBoard log directory")
            found = [path.parent]
        elif _is_run(path):
            found = [path]
        else:
            found = sorted({p.parent for p in path.rglob(EVENTS_GLOB) if p.is_file()}, key=_natural)
        if not found:
            raise ValueError(
                f"RUN_DIR {str(raw)!r} holds no run: no {EVENTS_GLOB} file in it or below it; expected a run's "
                "TensorBoard log directory or a folder above run directories"
            )
        runs += [run for run in found if run.resolve() not in {r.resolve() for r in runs}]
    return runs


def run_label(run: Path) -> str:
    """``name/version`` as Lightning lays runs out (``digits_quant4/version_0``)."""
    run = run.resolve()
    return f"{run.parent.name}/{run.name}" if run.parent.name else run.name


# -- reading a run ------------------------------------------------------------------------------------


def read_scalars(run: Path) -> Scalars:
    """Every scalar of the run: tag -> [(step, value)] in the order logged. From the event files (all of them,
    e.g. fit and test); keys only in MemoryMonitor's ``memory_log.csv`` are added from it, and the parameter
    count is taken from it (float64 there: exact, where the events' float32 is not beyond 2**24)."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    guidance = {ea.SCALARS: 0, ea.IMAGES: 1, ea.AUDIO: 1, ea.HISTOGRAMS: 1, ea.COMPRESSED_HISTOGRAMS: 1,
                ea.TENSORS: 1}
    acc = ea.EventAccumulator(str(run), size_guidance=guidance)
    acc.Reload()
    scalars: Scalars = {tag: [(e.step, float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()[ea.SCALARS]}
    for tag, series in _read_monitor_csv(run / "memory_log.csv").items():
        if tag == "model/trainable_params":
            scalars[tag] = series
        else:
            scalars.setdefault(tag, series)
    return scalars


def _read_monitor_csv(path: Path) -> Scalars:
    if not path.is_file():
        return {}
    series: Scalars = {}
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    step = int(float(row.pop("step", "") or 0))
                except ValueError:
                    continue
                for key, text in row.items():
                    try:
                        series.setdefault(key, []).append((step, float(text)))
                    except (TypeError, ValueError):
                        continue  # an empty cell: the key was not logged at that step
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    return series


def _read_config(run: Path) -> Mapping[str, Any] | None:
    path = run / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return config if isinstance(config, Mapping) else None


def _default_name(run: Path) -> str:
    run = run.resolve()
    return run.parent.name if re.fullmatch(r"version_\d+", run.name) and run.parent.name else run.name


def _pick_metric(tags: Sequence[str], metric: str | None) -> str | None:
    if metric is not None:
        return metric if metric in tags else None
    candidates = [
        t for t in tags
        if t.lower().startswith(("test/", "test_", "val/", "val_")) and re.search("acc|dice", t.lower())
    ]
    # test before val, top-1 before top-k, the plainest name first
    return min(candidates, key=lambda t: (t.lower().startswith("val"), "top" in t.lower(), len(t), t), default=None)


def summarize_run(run: Path, metric: str | None = None, scalars: Scalars | None = None) -> RunSummary:
    """The table row of one run directory (``scalars`` as :func:`read_scalars` returns them, read if not given)."""
    scalars = read_scalars(run) if scalars is None else scalars
    config = _read_config(run)
    technique = technique_of(config) if config is not None else _default_name(run)
    row = RunSummary(run=run_label(run), path=run, technique=technique)
    if "memory/alloc_after_step_mib" in scalars or "memory/reserved_mib" in scalars:
        row.device = "cuda"
    elif "memory/rss_mib" in scalars:
        row.device = "cpu"
    peaks = [v for _, v in scalars.get("memory/peak_mib", []) if math.isfinite(v)]
    row.peak_mib = max(peaks) if peaks else None
    raw = [(s, v) for s, v in scalars.get("memory/held_raw_mib", []) if math.isfinite(v)]
    if raw:
        step, row.held_raw_mib = max(raw, key=lambda sv: sv[1])
        stored = dict(scalars.get("memory/held_stored_mib", []))
        row.held_stored_mib = stored.get(step)
        if row.held_stored_mib:
            row.held_ratio = row.held_raw_mib / row.held_stored_mib
        else:
            row.held_ratio = dict(scalars.get("memory/held_ratio", [])).get(step)
    times = [v for _, v in sorted(scalars.get("time/step_s", []), key=lambda sv: sv[0]) if math.isfinite(v)]
    row.step_s = statistics.median(times[1:] if len(times) > 1 else times) if times else None  # first: warm-up
    row.metric = _pick_metric(list(scalars), metric)
    if row.metric is not None:
        row.metric_value = scalars[row.metric][-1][1] if scalars[row.metric] else None
    params = scalars.get("model/trainable_params")
    row.trainable_params = int(params[-1][1]) if params else None
    return row


# -- the table ----------------------------------------------------------------------------------------


def reference_index(rows: Sequence[RunSummary]) -> int:
    """The run the ratios are taken to: the first whose technique is ``baseline``, else the first."""
    return next((i for i, r in enumerate(rows) if r.technique == "baseline"), 0)


def _ratio(value: float | None, ref: float | None) -> float | None:
    return value / ref if value is not None and ref else None


def _ratios(rows: Sequence[RunSummary]) -> list[tuple[float | None, float | None, float | None]]:
    ref = rows[reference_index(rows)]
    return [(_ratio(r.peak_mib, ref.peak_mib), _ratio(r.held_stored_mib, ref.held_stored_mib),
             _ratio(r.step_s, ref.step_s)) for r in rows]


def _mib(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def _is_accuracy(metric: str | None) -> bool:
    return metric is not None and "acc" in metric.lower()


def _metric_text(row: RunSummary) -> str:
    if row.metric_value is None:
        return "-"
    return f"{100 * row.metric_value:.2f}%" if _is_accuracy(row.metric) else f"{row.metric_value:.4f}"


def _render(header: Sequence[str], body: Sequence[Sequence[str]], left: int) -> list[str]:
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *map(line, body)]


def format_table(rows: Sequence[RunSummary]) -> str:
    """The table as printed: one row per run, notes on what each column is, ratios to the reference run."""
    readings = {r.peak_reading for r in rows if r.peak_reading}
    peak_header = "step peak MiB" + (f" ({next(iter(readings))})" if len(readings) == 1 else "")
    metrics = {r.metric for r in rows if r.metric_value is not None}
    metric_header = next(iter(metrics)) if len(metrics) == 1 else "accuracy / Dice"
    header = ["run", "technique", peak_header, "held raw MiB", "held stored MiB", "held x", "step s", metric_header,
              "trainable params"]
    body = []
    for r in rows:
        peak = _mib(r.peak_mib)
        if len(readings) > 1 and r.peak_reading:
            peak += f" ({r.peak_reading})"
        metric = _metric_text(r)
        if len(metrics) > 1 and r.metric_value is not None:
            metric += f" ({r.metric})"
        body.append([
            r.run, r.technique, peak, _mib(r.held_raw_mib), _mib(r.held_stored_mib),
            "-" if r.held_ratio is None else f"{r.held_ratio:.2f}",
            "-" if r.step_s is None else f"{r.step_s:.4f}",
            metric,
            "-" if r.trainable_params is None else f"{r.trainable_params:,}",
        ])
    lines = _render(header, body, left=2)
    lines += [
        "",
        "step peak: the run's largest memory/peak_mib; VmHWM = the process's peak resident set (CPU runs),",
        "  max allocated = torch.cuda.max_memory_allocated (CUDA runs)",
        "held: bytes saved for backward at the step with the largest dense size (a full batch),",
        "  dense (raw) and as stored; held x = raw / stored",
        "step s: median of time/step_s without the first logged step (warm-up)",
        "accuracy / Dice: the last logged value, test/ preferred over val/",
    ]
    if len(rows) > 1:
        ref = rows[reference_index(rows)]
        lines += ["", f"relative to {ref.run} ({ref.technique}):"]
        ratio_body = [[r.run, r.technique, *("-" if x is None else f"{x:.2f}x" for x in ratios)]
                      for r, ratios in zip(rows, _ratios(rows))]
        lines += _render(["run", "technique", "step peak", "held stored", "step time"], ratio_body, left=2)
    return "\n".join(lines)


CSV_COLUMNS = ["run", "technique", "step_peak_mib", "step_peak_reading", "held_raw_mib", "held_stored_mib",
               "held_ratio", "step_s", "metric", "metric_value", "trainable_params", "reference",
               "step_peak_vs_reference", "held_stored_vs_reference", "step_s_vs_reference", "path"]


def write_csv(rows: Sequence[RunSummary], path: Path) -> None:
    """The table as a CSV (full precision; empty cells where a run lacks a figure), columns :data:`CSV_COLUMNS`."""
    ref = rows[reference_index(rows)].run if rows else ""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r, ratios in zip(rows, _ratios(rows) if rows else []):
            cells = [r.run, r.technique, r.peak_mib, r.peak_reading, r.held_raw_mib, r.held_stored_mib, r.held_ratio,
                     r.step_s, r.metric if r.metric_value is not None else None, r.metric_value, r.trainable_params,
                     ref, *ratios, str(r.path)]
            writer.writerow(["" if c is None else c for c in cells])


# -- the figure ---------------------------------------------------------------------------------------


def compare_figure(rows: Sequence[RunSummary]) -> Any:
    """Bars per run: step peak, held for backward (dense and stored), step time, accuracy or Dice."""
    import matplotlib

    if os.environ.get("MPLBACKEND") is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(rows)
    ticks = [f"{r.technique}\n" + r.run.replace("/", "/\n") for r in rows]
    ref = reference_index(rows)
    colors = ["0.6" if i == ref else "C0" for i in range(n)]
    fig, axes = plt.subplots(2, 2, figsize=(max(9.0, 3.2 * n + 2), 8), sharex=True, squeeze=False)
    readings = {r.peak_reading for r in rows if r.peak_reading}
    reading = f" ({next(iter(readings))})" if len(readings) == 1 else ""
    accuracy = any(_is_accuracy(r.metric) for r in rows if r.metric_value is not None)
    dice = any(not _is_accuracy(r.metric) for r in rows if r.metric_value is not None)

    def metric_value(r: RunSummary) -> float | None:
        if r.metric_value is None:
            return None
        return 100 * r.metric_value if accuracy and (_is_accuracy(r.metric) or dice) else r.metric_value

    metrics = {r.metric for r in rows if r.metric_value is not None}
    metric_title = next(iter(metrics)) if len(metrics) == 1 else "Accuracy or Dice"
    metric_label = "accuracy (%)" if accuracy and not dice else "Dice" if dice and not accuracy else \
        "accuracy (%) / Dice (x100)"
    panels = [
        (axes[0, 0], f"Step peak{reading}", "memory (MiB)", [r.peak_mib for r in rows], "{:.1f}"),
        (axes[1, 0], "Training step time (median)", "time (s)", [r.step_s for r in rows], "{:.3g}"),
        (axes[1, 1], f"{metric_title} (last logged)", metric_label, [metric_value(r) for r in rows],
         "{:.2f}%" if accuracy and not dice else "{:.4f}"),
    ]
    x = list(range(n))
    for ax, title, ylabel, values, fmt in panels:
        bars = ax.bar(x, [0.0 if v is None else v for v in values], color=colors)
        ax.bar_label(bars, labels=["-" if v is None else fmt.format(v) for v in values], fontsize="small")
        ax.set_title(title, fontsize="medium")
        ax.set_ylabel(ylabel)
    ax = axes[0, 1]
    width = 0.4
    raw = [r.held_raw_mib for r in rows]
    stored = [r.held_stored_mib for r in rows]
    bars = ax.bar([i - width / 2 for i in x], [0.0 if v is None else v for v in raw], width, color="C1", alpha=0.45,
                  label="dense (raw)")
    ax.bar_label(bars, labels=["-" if v is None else f"{v:.1f}" for v in raw], fontsize="small")
    bars = ax.bar([i + width / 2 for i in x], [0.0 if v is None else v for v in stored], width, color="C1",
                  label="stored")
    ax.bar_label(bars, labels=["-" if v is None else f"{v:.1f}" for v in stored], fontsize="small")
    ax.set_title("Held for backward per step (largest step)", fontsize="medium")
    ax.set_ylabel("memory (MiB)")
    ax.legend(fontsize="small", loc="upper right", ncols=2)
    for ax in axes.flat:
        ax.set_xticks(x, ticks, fontsize="small")
        ax.margins(y=0.25)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"memcomp compare: {n} run{'s' if n != 1 else ''} (grey: the reference, {rows[ref].run})")
    fig.tight_layout()
    return fig


# -- the command --------------------------------------------------------------------------------------


def _out_base(out: str | os.PathLike[str]) -> Path:
    path = Path(out)
    return path.with_suffix("") if path.suffix.lower() in (".png", ".csv") else path


def compare(
    run_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str] | None = "memcomp_compare",
    metric: str | None = None,
) -> tuple[list[RunSummary], str, list[Path]]:
    """Read the runs, build the table and write ``<out>.csv`` and ``<out>.png`` (nothing with ``out=None``).

    Returns:
        The rows, the table as printed, and the paths written.

    Raises:
        ValueError: a RUN_DIR that does not exist or holds no run; a ``metric`` no run has logged.
        OSError: the outputs cannot be written.
    """
    runs = find_runs(run_dirs)
    scalars = [read_scalars(run) for run in runs]
    if metric is not None and not any(metric in s for s in scalars):
        logged = ", ".join(sorted({t for s in scalars for t in s if t.lower().startswith(("test", "val"))}))
        logged = logged or "no test/ or val/ key"
        raise ValueError(f"--metric {metric!r} is not logged by any of the runs; they log: {logged}")
    rows = [summarize_run(run, metric, s) for run, s in zip(runs, scalars)]
    text = format_table(rows)
    written: list[Path] = []
    if out is not None:
        base = _out_base(out)
        if base.parent != Path("."):
            base.parent.mkdir(parents=True, exist_ok=True)
        csv_path, png_path = base.with_name(base.name + ".csv"), base.with_name(base.name + ".png")
        write_csv(rows, csv_path)
        written.append(csv_path)
        fig = compare_figure(rows)
        try:
            fig.savefig(png_path, dpi=100)
        finally:
            import matplotlib.pyplot as plt

            plt.close(fig)
        written.append(png_path)
    return rows, text, written


def build_parser() -> argparse.ArgumentParser:
    parser = ShortArgumentParser(
        prog=PROG,
        description="Compare training runs: step peak, bytes held for backward (raw/stored), step time, accuracy "
        "or Dice and trainable parameters, one row per run; writes a CSV and a bar chart beside the table.",
    )
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR",
        help="a run's TensorBoard log directory (e.g. memcomp_logs/digits_quant4/version_0) or a folder above run "
        "directories (e.g. memcomp_logs), which stands for every run under it",
    )
    parser.add_argument("--out", default="memcomp_compare", metavar="PATH",
                        help="write PATH.csv and PATH.png (default: memcomp_compare in the current directory)")
    parser.add_argument("--metric", default=None, metavar="NAME",
                        help="the accuracy/Dice key to show (default: a test/ key with acc or dice in its name, "
                        "else a val/ one), e.g. val/acc, test/dice")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``memcomp compare RUN_DIR... [--out PATH] [--metric NAME]``; returns the exit status (2 on a bad argument)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as err:  # argparse already printed its usage and message (or the help)
        return err.code if isinstance(err.code, int) else 2
    try:
        _, text, written = compare(args.run_dirs, args.out, args.metric)
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{PROG}: error: {err.filename or args.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(text)
    print()
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
