"""What a study writes: its fidelity.md/json/png, the meta they show, one progress line."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from pilamim.io import atomic_write_json, atomic_write_text
from pilamim.model import build_encoder

from . import chart, report, runs, stats
from .lowlevel import class_only_accuracy


def write_report(study: runs.Study, meta: dict[str, Any], started: float,
                 fresh: set[tuple[str, int]]) -> list[Path]:
    """(Re)write md, json and png from every results JSON of this study in ``out``.

    ``fresh``: the runs computed by this invocation; the others are marked reused.
    """
    results, ignored = runs.load_results(study.out, study.fingerprint)
    for r in results:
        r["cached"] = (r["entry"], r["seed"]) not in fresh
    meta = {**meta, "invocation_s": time.perf_counter() - started,
            "ignored": [str(p) for p in ignored]}
    md, data = report.build(results, runs.ENTRIES, meta)
    summary = stats.table(results)
    png = chart.bar_chart(summary, runs.ENTRIES, study.out / "fidelity.png",
                          f"Fidelity study, budget {study.budget}: mean ± std over seeds "
                          "(dots: single seeds)")
    return [atomic_write_text(study.out / "fidelity.md", md),
            atomic_write_json(study.out / "fidelity.json", data), png]


def portable(values: dict[str, Any], work: Path) -> dict[str, Any]:
    """``values`` with the absolute work folder written as the reader's own: relative to the
    working directory when inside it, else ``<work-dir>``. The report is committed; the
    machine that ran it is nobody else's business."""
    try:
        shown = work.relative_to(Path.cwd().absolute()).as_posix()
    except ValueError:
        shown = "<work-dir>"
    return json.loads(json.dumps(values).replace(str(work), shown))


def study_meta(study: runs.Study, args: argparse.Namespace, started: float) -> dict[str, Any]:
    encoder = build_encoder(study.params.model, study.prepared.channels)
    values = {g: getattr(study.params, g).model_dump(mode="json") for g in runs.TRACKED_GROUPS}
    values = portable(values, study.work)
    return {
        "budget": study.budget, "command": study.command, "fingerprint": study.fingerprint,
        "seeds": list(args.seeds), "overrides": list(args.set), "params": values,
        "expected_runs": len(runs.ENTRIES) * len(args.seeds),
        "split_sizes": {s: len(study.prepared.split(s)) for s in ("train", "val", "test")},
        "encoder_params": sum(p.numel() for p in encoder.parameters()),
        "lowlevel": {"class_only_test": class_only_accuracy(study.data),
                     "edges": study.data.edges.tolist()},
        "device": str(study.device), "torch_threads": torch.get_num_threads(),
        "jobs": args.jobs,
        "dataset_digest": study.prepared.digest, "setup_s": time.perf_counter() - started,
    }


def progress_line(i: int, n: int, result: dict[str, Any]) -> str:
    m = result["metrics"]
    shown = " ".join(f"{k}={100 * v:.1f}" for k, v in m.items() if v is not None)
    how = "reused" if result.get("cached") else f"{result['timing']['total_s']:.0f} s"
    return f"[{i}/{n}] {result['entry']} seed {result['seed']}: {shown} ({how})"
