"""The budget curve: each preset's metrics against pretraining steps and CPU-minutes.

One fidelity study per step multiplier (``pretrain.epochs`` x k, everything else the
embedded default); this module reads their results JSON and writes ``budget_curve.md``,
``.json`` and ``.png``. Every sentence of the reading is generated from the numbers, with
the study's rule for what counts as a difference (:func:`stats.compare`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pilamim.io import atomic_write

from .chart import COLORS
from .stats import LABELS, METRICS, Comparison, Summary, cell, compare, describe, summarize
from .stats import pts as signed_points

FLOORS_AT = 1  # the floors do not depend on pretraining length: measured once, at x1
CURVE_METRICS = ("probe_top1", "knn_top1", "lowlevel_top1", "lowlevel_knn_top1")


def study_dir(root: Path, multiplier: int) -> Path:
    """x1 is the fidelity study itself (``<root>/fidelity.md``); x2.. sit beside it."""
    return root if multiplier == 1 else root / f"budget_x{multiplier}"


@dataclass
class Point:
    """One preset at one multiplier, over its seeds."""

    entry: str
    multiplier: int
    steps: int
    metrics: dict[str, Summary | None]
    cpu_minutes: float | None  # pretraining CPU time of one run (see :func:`cpu_per_step`)


def cpu_per_step(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """entry -> pretraining CPU-seconds per step, mean over the x1 runs that measured it.

    A budget's cost is its steps times this: the step is the same at every budget, while a
    run's own CPU time misses whatever a killed-and-resumed run trained before the restart.
    """
    per: dict[str, list[float]] = {}
    for r in rows:
        if "pretrain_cpu_s" in r["timing"] and r.get("pretrain"):
            per.setdefault(r["entry"], []).append(
                r["timing"]["pretrain_cpu_s"] / r["pretrain"]["steps"])
    return {e: sum(v) / len(v) for e, v in per.items()}


def points(results: Mapping[int, Sequence[Mapping[str, Any]]], presets: Sequence[str]
           ) -> list[Point]:
    """``results``: multiplier -> that study's results; presets only (floors: :func:`floors`)."""
    cost = cpu_per_step(results.get(FLOORS_AT, []))
    out = []
    for k, rows in sorted(results.items()):
        for entry in presets:
            mine = [r for r in rows if r["entry"] == entry]
            if not mine:
                continue
            steps = int(mine[0]["pretrain"]["steps"])
            out.append(Point(
                entry, k, steps,
                {m: summarize(r["metrics"][m] for r in mine if r["metrics"].get(m) is not None)
                 for m in CURVE_METRICS},
                steps * cost[entry] / 60 if entry in cost else None))
    return out


def floors(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Summary | None]]:
    """random-init and raw-pixel floors from the x1 study: entry -> metric -> Summary."""
    out = {}
    for entry in ("random_init", "raw_pixels"):
        mine = [r for r in rows if r["entry"] == entry]
        if mine:
            out[entry] = {m: summarize(r["metrics"][m] for r in mine
                                       if r["metrics"].get(m) is not None)
                          for m in CURVE_METRICS}
    return out


# The ablations against the baseline and against the full method: where each stands is what
# a user choosing a preset for a longer schedule reads first.
OTHER_PAIRS = (("pilamim_nocls", "mae"), ("pilamim_nocls", "pilamim"), ("latent", "mae"),
               ("latent", "pilamim"))


def _verdict_cell(c: Comparison) -> str:
    if c.spread is None:
        return f"{signed_points(c.diff)} (one seed)"
    times = "no spread" if c.spread == 0 else f"{c.ratio:.1f}×"
    return f"{signed_points(c.diff)} ({times}) {c.verdict}"


def pair_table(curve_points: Sequence[Point], pairs: Sequence[tuple[str, str]] = OTHER_PAIRS
               ) -> list[str]:
    """One row per pair and metric, one column per budget: difference, |diff|/spread, verdict."""
    by = {(p.entry, p.multiplier): p for p in curve_points}
    ks = sorted({p.multiplier for p in curve_points})
    rows = []
    for a, b in pairs:
        for metric in ("probe_top1", "knn_top1"):
            cells = []
            for k in ks:
                sa = by[(a, k)].metrics.get(metric) if (a, k) in by else None
                sb = by[(b, k)].metrics.get(metric) if (b, k) in by else None
                cells.append("—" if sa is None or sb is None
                             else _verdict_cell(compare(sa, sb, metric, a, b)))
            if any(c != "—" for c in cells):
                rows.append(f"| {LABELS.get(a, a)} vs {LABELS.get(b, b)} | {METRICS[metric]} | "
                            + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", "The other presets (points; |diff| / seed spread; verdict):", "",
            "| pair | metric | " + " | ".join(f"x{k}" for k in ks) + " |",
            "|---|---|" + "---|" * len(ks), *rows]


def reading(pts: Sequence[Point], floor: Mapping[str, Mapping[str, Summary | None]],
            a: str = "pilamim", b: str = "mae") -> list[str]:
    """Where ``a`` overtakes ``b``, and where each preset's probe crosses raw pixels."""
    lines = []
    by = {(p.entry, p.multiplier): p for p in pts}
    ks = sorted({p.multiplier for p in pts})
    for metric in ("probe_top1", "knn_top1"):
        for k in ks:
            pa, pb = by.get((a, k)), by.get((b, k))
            sa = pa.metrics.get(metric) if pa else None
            sb = pb.metrics.get(metric) if pb else None
            if sa is None or sb is None:
                continue
            lines.append(f"- x{k} ({pa.steps} steps): {describe(compare(sa, sb, metric, a, b))}")
    lines += pair_table(pts)
    raw = floor.get("raw_pixels", {}).get("probe_top1")
    if raw is not None:
        lines.append("")
        for entry in sorted({p.entry for p in pts}):
            crossed = [p for p in pts if p.entry == entry and p.metrics["probe_top1"] is not None
                       and compare(p.metrics["probe_top1"], raw, "probe_top1", entry,
                                   "raw_pixels").verdict == "wins"]
            above = [p for p in pts if p.entry == entry and p.metrics["probe_top1"] is not None
                     and p.metrics["probe_top1"].mean > raw.mean]
            name = LABELS.get(entry, entry)
            if crossed:
                first = min(crossed, key=lambda p: p.multiplier)
                lines.append(f"- {name}'s probe beats raw pixels beyond the seed spread from x"
                             f"{first.multiplier} ({first.steps} steps) on.")
            elif above:
                first = min(above, key=lambda p: p.multiplier)
                lines.append(f"- {name}'s probe mean is above raw pixels from x{first.multiplier}"
                             f" ({first.steps} steps), but not beyond the seed spread (or with "
                             "one seed).")
            else:
                best = max((p for p in pts if p.entry == entry
                            and p.metrics["probe_top1"] is not None),
                           key=lambda p: p.metrics["probe_top1"].mean, default=None)
                if best is not None:
                    gap = 100 * (raw.mean - best.metrics["probe_top1"].mean)
                    lines.append(f"- {name}'s probe stays below raw pixels at every budget run "
                                 f"(closest: x{best.multiplier}, {gap:.2f} points below).")
    return lines


def markdown(pts: Sequence[Point], floor: Mapping[str, Mapping[str, Summary | None]],
             meta: Mapping[str, Any]) -> str:
    ks = sorted({p.multiplier for p in pts})
    entries = list(dict.fromkeys(p.entry for p in pts))
    lines = [
        "# Budget curve: linear probe, kNN and low-level task against pretraining length", "",
        f"Written by `{meta['command']}` on {meta['written_at']}. Each budget is the embedded "
        "default (`params/`) with `pretrain.epochs` multiplied; everything else, including the "
        "evaluation protocols, is the fidelity study's (`fidelity.md` beside this file is x1; "
        "`budget_x<k>/fidelity.md` has every run of budget k). Numbers are test-split top-1 "
        "in %, mean ± sample std over seeds (n = seeds). CPU-minutes: a run's pretraining "
        "steps times the CPU-seconds per step its preset took at x1 (mean over the x1 runs; "
        f"threads per process: {meta['threads']}).", "",
        "![budget curve](budget_curve.png)", "",
        "| budget | steps | entry | " + " | ".join(METRICS[m] for m in CURVE_METRICS)
        + " | pretraining CPU-min |",
        "|---|---|---|" + "---|" * len(CURVE_METRICS) + "---|",
    ]
    by = {(p.entry, p.multiplier): p for p in pts}
    for k in ks:
        for entry in entries:
            p = by.get((entry, k))
            if p is None:
                continue
            cpu = "—" if p.cpu_minutes is None else f"{p.cpu_minutes:.1f}"
            lines.append(f"| x{k} | {p.steps} | {LABELS.get(entry, entry)} | "
                         + " | ".join(cell(p.metrics[m]) for m in CURVE_METRICS) + f" | {cpu} |")
    for entry, row in floor.items():
        lines.append(f"| any | 0 | {LABELS.get(entry, entry)} | "
                     + " | ".join(cell(row.get(m)) for m in CURVE_METRICS) + " | 0 |")
    lines += ["", "## Reading (generated from the numbers)", "",
              "A difference counts only when |difference of means| is larger than the pooled "
              "seed std, sqrt((s_a² + s_b²) / 2); with one seed there is no spread and no "
              "comparison is a finding.", "",
              *reading(pts, floor), "",
              "## Studies", "",
              "| budget | folder | fingerprint | runs |", "|---|---|---|---|"]
    for k, info in sorted(meta["studies"].items()):
        lines.append(f"| x{k} | `{info['folder']}` | `{info['fingerprint']}` | {info['runs']} |")
    return "\n".join(lines) + "\n"


def chart(pts: Sequence[Point], floor: Mapping[str, Mapping[str, Summary | None]],
          path: str | Path) -> Path:
    """Probe top-1 against steps and against CPU-minutes, kNN against steps; floors as lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(14, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    panels = (("probe_top1", "steps", "linear probe top-1 vs pretraining steps"),
              ("probe_top1", "cpu", "linear probe top-1 vs pretraining CPU-minutes"),
              ("knn_top1", "steps", "kNN top-1 vs pretraining steps"))
    for i, (metric, axis, title) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        for entry in dict.fromkeys(p.entry for p in pts):
            mine = sorted((p for p in pts if p.entry == entry and p.metrics[metric] is not None
                           and (axis == "steps" or p.cpu_minutes is not None)),
                          key=lambda p: p.multiplier)
            if not mine:
                continue
            xs = [p.steps if axis == "steps" else p.cpu_minutes for p in mine]
            ax.errorbar(xs, [100 * p.metrics[metric].mean for p in mine],
                        yerr=[100 * p.metrics[metric].std for p in mine], marker="o",
                        capsize=3, color=COLORS.get(entry), label=LABELS.get(entry, entry))
            for x, p in zip(xs, mine, strict=True):
                ax.scatter([x] * p.metrics[metric].n, [100 * v for v in p.metrics[metric].values],
                           s=8, color="black", zorder=3)
        for entry, style in (("raw_pixels", "--"), ("random_init", ":")):
            s = floor.get(entry, {}).get(metric)
            if s is not None:
                ax.axhline(100 * s.mean, linestyle=style, color=COLORS[entry], linewidth=1.5,
                           label=f"{LABELS[entry]} {100 * s.mean:.1f}")
                if s.n > 1:
                    ax.axhspan(100 * (s.mean - s.std), 100 * (s.mean + s.std),
                               color=COLORS[entry], alpha=0.25)
        ax.set_xscale("log", base=2)
        if axis == "steps":  # the budgets themselves, not powers of two
            steps = sorted({p.steps for p in pts})
            ax.set_xticks(steps, labels=[f"{s:,}" for s in steps])
            ax.minorticks_off()
        else:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_xlabel("pretraining steps (batch 256)" if axis == "steps"
                      else "pretraining CPU-minutes per run")
        ax.set_ylabel(f"{METRICS[metric]} on test (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def to_json(pts: Sequence[Point], floor: Mapping[str, Mapping[str, Summary | None]],
            meta: Mapping[str, Any]) -> dict[str, Any]:
    def s(x: Summary | None) -> dict[str, Any] | None:
        return None if x is None else {"mean": x.mean, "std": x.std, "n": x.n,
                                       "values": x.values}

    return {"meta": dict(meta),
            "points": [{"entry": p.entry, "multiplier": p.multiplier, "steps": p.steps,
                        "cpu_minutes": p.cpu_minutes,
                        "metrics": {m: s(v) for m, v in p.metrics.items()}} for p in pts],
            "floors": {e: {m: s(v) for m, v in row.items()} for e, row in floor.items()}}
