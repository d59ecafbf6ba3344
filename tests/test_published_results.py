"""The README's "Results" table quotes the committed benchmark files: every figure must match them."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- results-table: begin -->", "<!-- results-table: end -->"
#: README column header -> (CSV file in benchmarks/results, CSV column)
SOURCES = {
    "ResNet-18 batch x": ("bench_resnet18_cifar_cpu.csv", "batch_multiplier"),
    "ResNet-18 held": ("bench_resnet18_cifar_cpu.csv", "held_ratio"),
    "ResNet-18 step time": ("bench_resnet18_cifar_cpu.csv", "time_ratio"),
    "ResNet-50 batch x": ("bench_resnet50_cpu.csv", "batch_multiplier"),
    "ResNet-50 step time": ("bench_resnet50_cpu.csv", "time_ratio"),
    "3-D UNet batch x": ("bench_unet3d_cpu.csv", "batch_multiplier"),
    "3-D UNet held": ("bench_unet3d_cpu.csv", "held_ratio"),
    "3-D UNet step time": ("bench_unet3d_cpu.csv", "time_ratio"),
}
# every method of the issue: baseline, the alternatives, every technique (ResNet-50: the peak-per-sample set)
REQUIRED_RESNET50 = {"baseline", "checkpoint", "floor:2", "floor:4", "quant:4", "quant:2", "blpa:4"}
REQUIRED = {"baseline", "bf16", "checkpoint", "quant:8", "quant:4", "quant:2", "blpa:4", "wavelet:4", "wavelet:10",
            "dct:4", "dct:10", "threshold:4", "threshold:10", "bandlimit:50", "bandlimit:85", "csg"}


def _readme_table() -> tuple[list[str], dict[str, list[str]]]:
    text = (ROOT / "README.md").read_text()
    assert BEGIN in text and END in text, "README.md has no results table between the markers"
    lines = [ln.strip() for ln in text.split(BEGIN, 1)[1].split(END, 1)[0].splitlines() if ln.strip().startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return header[1:], rows


def _csv(name: str) -> dict[str, dict[str, str]]:
    with open(RESULTS / name, newline="") as f:
        return {row["method"]: row for row in csv.DictReader(f)}


def _required(name: str) -> set[str]:
    return REQUIRED_RESNET50 if "resnet50" in name else REQUIRED | {"floor:2", "floor:4"}


def test_the_committed_tables_hold_every_method_for_every_network():
    for name in {source for source, _ in SOURCES.values()}:
        rows = _csv(name)
        measured = {m for m, row in rows.items() if row["status"] == "ok"}
        assert _required(name) <= measured, f"{name} lacks {sorted(_required(name) - measured)}"
        # the batch multiplier (peak per sample at two batch sizes) is measured for every method
        assert all(rows[m]["batch_multiplier"] not in ("", None) for m in _required(name)), name
        md = (RESULTS / name).with_suffix(".md").read_text()
        assert "Partial results" not in md
        assert re.search(r"machine: .+, \d+ cores", md) and "torch " in md


@pytest.mark.parametrize("column", list(SOURCES))
def test_readme_results_match_the_committed_files(column):
    header, rows = _readme_table()
    assert set(header) == set(SOURCES)
    assert REQUIRED <= set(rows), f"README table lacks {sorted(REQUIRED - set(rows))}"
    name, key = SOURCES[column]
    data = _csv(name)
    i = header.index(column)
    for method, cells in rows.items():
        if method not in data:
            assert cells[i] == "-", f"README {column} of {method}: {cells[i]} (not in {name})"
            continue
        assert cells[i] == f"{float(data[method][key]):.2f}x", f"README {column} of {method}: {cells[i]}"
