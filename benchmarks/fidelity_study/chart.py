"""The study's bar chart: mean ± std per entry and metric, every seed drawn as a dot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pilamim.io import atomic_write

from .stats import LABELS, METRICS, Summary

COLORS = {"pilamim": "#1f77b4", "pilamim_nocls": "#6baed6", "mae": "#ff7f0e",
          "latent": "#2ca02c", "random_init": "#7f7f7f", "raw_pixels": "#bdbdbd"}


def bar_chart(summary: Mapping[str, Mapping[str, Summary | None]], entries: Sequence[str],
              path: str | Path, title: str) -> Path:
    """Grouped bars (one group per metric), std error bars, seeds as dots; off-screen (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    entries = [e for e in entries if e in summary]
    metrics = list(METRICS)
    width = 0.8 / max(1, len(entries))
    fig = Figure(figsize=(11, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, entry in enumerate(entries):
        xs, means, errs, dots = [], [], [], []
        for j, metric in enumerate(metrics):
            s: Any = summary[entry].get(metric)
            if s is None:
                continue
            x = j + (i - (len(entries) - 1) / 2) * width
            xs.append(x)
            means.append(100 * s.mean)
            errs.append(100 * s.std)
            dots.extend((x, 100 * v) for v in s.values)
        ax.bar(xs, means, width * 0.95, yerr=errs, capsize=3, label=LABELS.get(entry, entry),
               color=COLORS.get(entry), edgecolor="black", linewidth=0.4)
        if dots:
            ax.scatter([d[0] for d in dots], [d[1] for d in dots], s=8, color="black", zorder=3)
    ax.set_xticks(range(len(metrics)), labels=[METRICS[m] for m in metrics], fontsize=8)
    ax.set_ylabel("accuracy on test split (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="upper right")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
