"""The plot of a run: memory saved against time added, per method (and accuracy where measured)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning_memcomp.bench.results import MethodResult

__all__ = ["plot"]


def plot(results: Sequence[MethodResult], path: Path, title: str) -> None:
    """PNG: memory saved (held for backward, after forward) against time added; accuracy where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok" and r.time_ratio is not None]
    with_acc = [r for r in ok if r.accuracy is not None]
    panels = [("held for backward", "held_ratio"), ("after forward", "after_forward_ratio")]
    n = len(panels) + (1 if with_acc else 0)
    fig, axes = plt.subplots(1, n, figsize=(6.2 * n, 5.2), squeeze=False)
    colors = {"baseline": "black", "alternative": "tab:red", "activation compression": "tab:blue",
              "band-limit": "tab:green", "slice generator": "tab:purple"}
    for ax, (label, attr) in zip(axes[0], panels):
        for r in ok:
            ratio = getattr(r, attr)
            if ratio is None:
                continue
            xs, ys = 100.0 * (r.time_ratio - 1.0), 100.0 * (1.0 - ratio)  # type: ignore[operator]
            ax.scatter(xs, ys, color=colors.get(r.family, "gray"), s=36, zorder=3)
            ax.annotate(r.method, (xs, ys), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.axhline(0, color="gray", lw=0.6)
        ax.axvline(0, color="gray", lw=0.6)
        ax.set_xlabel("time added per training step (%)")
        ax.set_ylabel(f"memory saved, {label} (%)")
        ax.grid(alpha=0.3)
    if with_acc:
        ax = axes[0][-1]
        for r in with_acc:
            ys = 100.0 * (1.0 - (r.held_ratio or 1.0))
            ax.scatter(r.accuracy, ys, color=colors.get(r.family, "gray"), s=36, zorder=3)
            ax.annotate(r.method, (r.accuracy, ys), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xlabel(with_acc[0].accuracy_metric or "accuracy")
        ax.set_ylabel("memory saved, held for backward (%)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in colors.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(colors), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


