"""Print the README's "Results" table from the committed benchmark CSVs: the batch multiplier first (how many times
larger a batch fits, from the step peak per sample), then held bytes and step time, each vs the baseline.

    python benchmarks/results_table.py            # paste between the results-table markers of README.md
    python benchmarks/results_table.py --check    # exit 1 when README.md's table differs from the files

``tests/test_published_results.py`` checks every figure of the README against the same files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_memcomp.bench.report import format_ratio, markdown_table, read_csv

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: (label, CSV file, columns): each column is (README header suffix, CSV attribute)
NETWORKS = (
    ("ResNet-18", "bench_resnet18_cifar_cpu.csv", (("batch x", "batch_multiplier"), ("held", "held_ratio"),
                                                   ("step time", "time_ratio"))),
    ("ResNet-50", "bench_resnet50_cpu.csv", (("batch x", "batch_multiplier"), ("step time", "time_ratio"))),
    ("3-D UNet", "bench_unet3d_cpu.csv", (("batch x", "batch_multiplier"), ("held", "held_ratio"),
                                         ("step time", "time_ratio"))),
)
BEGIN, END = "<!-- results-table: begin -->", "<!-- results-table: end -->"


def table() -> str:
    """The README table: each method's batch multiplier, held-for-backward and step-time ratios on each network,
    as the benchmark's report writes ratios (``-``: the method was not run on that network)."""
    data = [(label, {r.method: r for r in read_csv(RESULTS / name)}, columns) for label, name, columns in NETWORKS]
    methods = list(dict.fromkeys(m for _, rows, _ in data for m in rows))
    header = ["method"] + [f"{label} {column}" for label, _, columns in data for column, _ in columns]
    rows = []
    for method in methods:
        cells = [f"`{method}`"]
        for _, results, columns in data:
            r = results.get(method)
            cells += [format_ratio(getattr(r, key) if r else None) for _, key in columns]
        rows.append(cells)
    return markdown_table(header, rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with README.md instead of printing")
    args = parser.parse_args()
    text = table()
    if not args.check:
        print(text)
        return 0
    readme = (ROOT / "README.md").read_text()
    current = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip() if BEGIN in readme else ""
    if current != text:
        print("README.md's results table differs from benchmarks/results; regenerate it:\n" + text, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
