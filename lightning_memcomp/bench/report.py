"""Reports: the terminal table, the markdown report, CSV written and read back, and the files of a run.

The cell formats (:func:`format_mib`, :func:`format_ratio`, :func:`format_number`) and :func:`markdown_table`
are the ones every table in ``benchmarks/results`` is written with.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from lightning_memcomp.bench.config import BenchConfig
from lightning_memcomp.bench.machine import machine_info
from lightning_memcomp.bench.networks import NetworkSpec, resolve_network
from lightning_memcomp.bench.results import MethodResult

__all__ = ["COLUMNS", "MiB", "PER_SAMPLE_COLUMNS", "format_markdown", "format_mib", "format_number", "format_ratio",
           "format_table", "markdown_row", "markdown_table", "read_csv", "write_csv", "write_outputs"]

MiB = 1024 * 1024


def format_mib(value: float | None) -> str:
    """Bytes as MiB with one decimal; ``-`` for a missing figure."""
    return "-" if value is None else f"{value / MiB:.1f}"


def format_ratio(ratio: float | None) -> str:
    """A ratio as ``0.25x``; ``-`` for a missing one."""
    return "-" if ratio is None else f"{ratio:.2f}x"


def format_number(value: float | None, fmt: str) -> str:
    """``format(value, fmt)``; ``-`` for a missing figure."""
    return "-" if value is None else format(value, fmt)


def markdown_row(cells: Iterable[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


_ALIGN = {"l": "---", "r": "---:", "c": ":-:"}


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A markdown table. ``align``: one letter per column, ``l`` (left), ``r`` (right) or ``c`` (centre);
    by default the first column left and the others right."""
    align = align if align is not None else "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or set(align) - set(_ALIGN):
        raise ValueError(f"align={align!r} is not allowed; give one of l, r, c for each of the {len(header)} columns")
    lines = [markdown_row(header), "|" + "|".join(_ALIGN[a] for a in align) + "|"]
    lines += [markdown_row(row) for row in rows]
    return "\n".join(lines)


COLUMNS = ("method", "held MiB", "x base", "after-fwd MiB", "x base", "step peak MiB", "x base", "step s",
           "x base", "params", "x base", "accuracy")


PER_SAMPLE_COLUMNS = ("peak/sample MiB", "batch x")


def _has_per_sample(results: Sequence[MethodResult]) -> bool:
    return any(r.peak_per_sample_bytes is not None for r in results)


def _per_sample_cells(r: MethodResult) -> list[str]:
    per_sample = None if r.peak_per_sample_bytes is None else r.peak_per_sample_bytes / 2**20
    return [format_number(per_sample, ".2f"), format_ratio(r.batch_multiplier)]


def _figures(r: MethodResult) -> list[str]:
    return [r.method, format_mib(r.held_bytes), format_ratio(r.held_ratio), format_mib(r.after_forward_bytes),
            format_ratio(r.after_forward_ratio), format_mib(r.step_peak_bytes), format_ratio(r.step_peak_ratio),
            format_number(r.step_time_s, ".3f"), format_ratio(r.time_ratio), format_number(r.trainable_params, ","),
            format_ratio(r.params_ratio), format_number(r.accuracy, ".1f")]


def _row(r: MethodResult, per_sample: bool = False) -> list[str]:
    columns = COLUMNS + (PER_SAMPLE_COLUMNS if per_sample else ())
    if r.status != "ok":
        return [r.method, f"{r.status}: {r.error}"] + [""] * (len(columns) - 2)
    return _figures(r) + (_per_sample_cells(r) if per_sample else [])


def format_table(results: Sequence[MethodResult]) -> str:
    """The terminal table: figures and their ratios to the baseline (with --peak-batch, peak per sample too)."""
    per_sample = _has_per_sample(results)
    header = list(COLUMNS + (PER_SAMPLE_COLUMNS if per_sample else ()))
    rows = [header] + [_row(r, per_sample) for r in results]
    ok_rows = [row for row, r in zip(rows[1:], results) if r.status == "ok"]
    widths = [max(len(row[i]) for row in [rows[0], *ok_rows]) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        if i and results[i - 1].status != "ok":
            lines.append(f"{row[0]:<{widths[0]}}  {row[1]}")
            continue
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(results: Sequence[MethodResult], path: Path) -> None:
    names = [f.name for f in fields(MethodResult)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for r in results:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})


def read_csv(path: str | Path) -> list[MethodResult]:
    """Read a CSV written by :func:`write_csv` back into results (empty cells become ``None``)."""
    types = {f.name: f.type for f in fields(MethodResult)}
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            data: dict[str, Any] = {}
            for k, v in row.items():
                t = str(types.get(k, "str"))
                if v == "" and "None" in t:
                    data[k] = None
                elif t.startswith("int"):
                    data[k] = int(v)
                elif t.startswith("float"):
                    data[k] = float(v)
                elif t.startswith("bool"):
                    data[k] = v == "True"
                else:
                    data[k] = v
            out.append(MethodResult.from_dict(data))
    return out


def format_markdown(results: Sequence[MethodResult], cfg: BenchConfig, spec: NetworkSpec,
                    info: dict[str, str], command: str, notes: Sequence[str] = (), pending: Sequence[str] = ()) -> str:
    """The markdown report: machine, settings, the table with ratios, the methods and what failed."""
    memory = "process RSS growth (MALLOC_MMAP_THRESHOLD_=65536)" if info["device"].startswith("cpu") else \
        "torch.cuda.memory_allocated"
    per_sample = _has_per_sample(results)
    peak = ("peak RSS (VmHWM, reset each step) above the step's start, plus the parameters, buffers, optimizer "
            "state and batch that live across steps" if info["device"].startswith("cpu")
            else "torch.cuda.max_memory_allocated, reset each step")
    header = ["method", "held MiB", "held x", "after-fwd MiB", "after-fwd x", "step peak MiB", "peak x", "step s",
              "time x", "params", "params x", "accuracy", "Pareto"] + (list(PER_SAMPLE_COLUMNS) if per_sample else [])
    rows = [_figures(r) + ["yes" if r.pareto else ""] + (_per_sample_cells(r) if per_sample else [])
            for r in results if r.status == "ok"]
    table = markdown_table(header, rows, "l" + "r" * 11 + "c" + ("rr" if per_sample else "")).splitlines()
    lines = [
        f"# memcomp bench: {spec.name}, input {'x'.join(map(str, spec.input_shape))}, {info['device']}",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores; GPU: {info['gpu']}",
        f"- torch {info['torch']}, Python {info['python']}; {info['date']}; load average at the end "
        f"{info['load']}; torch threads per worker: {cfg.threads or 'torch default'}",
        f"- command: `{command}`",
        f"- {cfg.warmup} warm-up and {cfg.steps} measured training steps (forward, backward, SGD momentum "
        f"0.9) per method, each method in a fresh process; timing: {cfg.timing}"
        + (" (each worker alternates baseline and method steps; the ratio compares the two medians)"
           if cfg.timing == "interleaved" else " (ratios across processes)"),
        f"- held = bytes kept for backward (saved-tensor ledger); after-fwd = {memory}; step peak = {peak}",
        "",
        *table[:2],
    ]
    ok_rows = iter(table[2:])
    for r in results:  # a row that was not measured says why across the figures' columns
        lines.append(next(ok_rows) if r.status == "ok" else
                     f"| {r.method} | {r.status}: {r.error} |" + " |" * (len(header) - 1))
    metric = next((r.accuracy_metric for r in results if r.accuracy_metric), "")
    lines += ["", "x = ratio to the baseline row; Pareto = no other row holds fewer bytes for backward and is faster."]
    if per_sample:
        lines.append(f"peak/sample = (step peak at batch {cfg.peak_batch} - step peak at batch {spec.batch_size}) / "
                     f"{cfg.peak_batch - spec.batch_size}; batch x = the baseline's peak/sample over the method's: "
                     "how many times larger a batch fits.")
    if metric:
        lines.append(f"accuracy: {metric} after {cfg.accuracy_epochs} epoch(s), Adam lr 2e-3.")
    lines += ["", "| method | what it is | notes |", "|---|---|---|"]
    lines += [f"| {r.method} | {r.description} | {r.notes} |" for r in results]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    if pending:
        lines += ["", f"**Partial results**: still to measure: {', '.join(pending)}."]
    missing = [r for r in results if r.status != "ok"]
    if missing:
        lines += ["", "Not measured:"] + [f"- {r.method}: {r.status}: {r.error}" for r in missing]
    return "\n".join(lines) + "\n"


def write_outputs(results: Sequence[MethodResult], cfg: BenchConfig, out: Path, name: str | None,
                  command: str, notes: Sequence[str] = (), pending: Sequence[str] = ()) -> dict[str, Path]:
    """CSV, markdown and PNG into ``out`` (created); returns their paths."""
    from lightning_memcomp.bench.plot import plot

    device = cfg.resolved_device()
    spec = resolve_network(cfg)
    info = machine_info(device)
    out.mkdir(parents=True, exist_ok=True)
    base = name or f"bench_{spec.name}{'_compiled' if cfg.compile else ''}_{device.type}"
    paths = {"csv": out / f"{base}.csv", "md": out / f"{base}.md", "png": out / f"{base}.png"}
    write_csv(results, paths["csv"])
    paths["md"].write_text(format_markdown(results, cfg, spec, info, command, notes, pending))
    plot(results, paths["png"], f"{spec.name} {'x'.join(map(str, spec.input_shape))} on {info['cpu'] if device.type == 'cpu' else info['gpu']}, "
         f"torch {info['torch']}, {info['date']}")
    return paths
