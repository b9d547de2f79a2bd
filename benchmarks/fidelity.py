"""Fidelity study: does our PiLaMIM learn better features than its own baselines?

Pretrains the presets ``pilamim``, ``pilamim_nocls``, ``mae`` and ``latent`` with one shared
budget through the real library (``pilamim pretrain``'s code), adds two floors (an untrained
encoder, a linear probe on raw pixels), evaluates every one with the same linear probe, kNN,
fine-tune and low-level protocols, tracks every run in MLflow under one parent run, and writes
``<out>/fidelity.md``, ``fidelity.png`` and ``fidelity.json``.

Run it from the repository root:

    python -m benchmarks.fidelity --budget cpu --seeds 0 1 2 --out reports/
    python -m benchmarks.fidelity --scale                   # GPU budget (ViT-S, longer)
    python -m benchmarks.fidelity --budget cpu --seeds 3 4  # add seeds to the same study
    python -m benchmarks.fidelity --budget cpu --only mae   # (re)run only some entries

Each run's results land in ``<out>/fidelity_runs/<entry>-seed<k>.json``; a run whose JSON
exists is reused, so a killed study continues where it stopped (delete a JSON to redo that
run). The report covers every results JSON of the same study params in ``<out>``.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.fidelity_study import parallel, runs, stats
from benchmarks.fidelity_study.budgets import (
    BUDGETS,
    DEFAULT_SEEDS,
    budget_params,
    runtime,
    with_paths,
)
from benchmarks.fidelity_study.lowlevel import load_eval_images
from benchmarks.fidelity_study.output import progress_line, study_meta, write_report
from pilamim.config import ParamsError
from pilamim.data.prepare import prepare
from pilamim.device import resolve_device


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu",
                    help="micro: test-sized; cpu: the 2-core study; gpu: ViT-S, longer")
    ap.add_argument("--scale", action="store_true", help="shorthand for --budget gpu")
    ap.add_argument("--seeds", type=int, nargs="+", help="default: the budget's (cpu: 0 1 2)")
    ap.add_argument("--out", default="reports", help="report + per-run results JSON")
    ap.add_argument("--work-dir", help="models and prepared data (default "
                    "models/fidelity/<budget>)")
    ap.add_argument("--only", "--presets", nargs="+", choices=runs.ENTRIES, dest="only",
                    metavar="ENTRY", help="run only these of " + ", ".join(runs.ENTRIES) +
                    " (the others are still reported when their results are on disk)")
    ap.add_argument("--params", help="base params directory (default: the repo's params/)")
    ap.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE",
                    help="override a param for every run (e.g. model.norm_pix_loss=true)")
    ap.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    ap.add_argument("--jobs", type=int, help="worker processes (default: the budget's; "
                    "cpu: 2, one per core)")
    ap.add_argument("--threads", type=int, help="torch CPU threads per process (default: "
                    "the budget's; cpu/micro: 1)")
    args = ap.parse_args(argv)
    if args.scale:
        args.budget = "gpu"
    args.seeds = args.seeds if args.seeds is not None else DEFAULT_SEEDS[args.budget]
    args.jobs, args.threads = runtime(args.budget, args.jobs, args.threads)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        params = budget_params(args.budget, args.params, args.set)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = Path(args.work_dir or f"models/fidelity/{args.budget}").absolute()
    out = Path(args.out)
    entries = [e for e in runs.ENTRIES if not args.only or e in args.only]
    todo = [(seed, entry) for entry in sorted(entries, key=runs.RUN_ORDER.index)
            for seed in args.seeds]
    shared = with_paths(params, work, "shared", params.model.preset, 0)
    clash = runs.mismatched(out, todo, runs.fingerprint(shared))
    if clash:
        print(f"error: {len(clash)} results JSON in {out} were made with other study params "
              f"(e.g. {clash[0]}): use another --out folder, or delete them to redo those runs",
              file=sys.stderr)
        return 2
    prepared = prepare(shared.data)
    data = load_eval_images(prepared, params.model.img_size)
    study = runs.Study(params=shared, budget=args.budget, work=work, out=out,
                       prepared=prepared, data=data,
                       device=resolve_device(params.pretrain.device),
                       command="python -m benchmarks.fidelity " + shlex.join(argv),
                       track=not args.no_track)
    meta = study_meta(study, args, started)
    failed, fresh = [], set()
    with _parent_run(study, args) as parent:
        for i, done in enumerate(parallel.execute(study, todo, args.jobs, args.threads), 1):
            if done.result is None:
                failed.append(done)
                print(f"[{i}/{len(todo)}] {done.entry} seed {done.seed} FAILED:\n{done.error}",
                      file=sys.stderr, flush=True)
            else:
                print(progress_line(i, len(todo), done.result), flush=True)
                if not done.result["cached"]:
                    fresh.add((done.entry, done.seed))
            paths = write_report(study, meta, started, fresh)
        if not todo:
            paths = write_report(study, meta, started, fresh)
        if parent is not None:
            for path in paths:
                parent.log_artifact(path, "report")
            parent.log_metrics(_means(study))
    print(f"report: {paths[0]}")
    if failed:
        names = ", ".join(f"{f.entry}-seed{f.seed}" for f in failed)
        print(f"{len(failed)} run(s) failed ({names}); rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _parent_run(study: runs.Study, args: argparse.Namespace) -> Iterator[Any]:
    """One MLflow parent run for the whole study; child runs find it through the env."""
    if not study.track:
        yield None
        return
    from pilamim.tracking.runs import pipeline_run

    tags = {"fidelity.budget": study.budget, "fidelity.seeds": " ".join(map(str, args.seeds)),
            "fidelity.fingerprint": study.fingerprint, "fidelity.command": study.command}
    with pipeline_run(study.params, run_name="fidelity-study", extra_tags=tags) as parent:
        yield parent


def _means(study: runs.Study) -> dict[str, float]:
    """``<entry>/<metric>_mean`` and ``_std`` for the parent run (compare in the MLflow UI)."""
    results, _ = runs.load_results(study.out, study.fingerprint)
    out = {}
    for entry, row in stats.table(results).items():
        for metric, s in row.items():
            if s is not None:
                out[f"{entry}/{metric}_mean"] = s.mean
                out[f"{entry}/{metric}_std"] = s.std
    return out


if __name__ == "__main__":
    raise SystemExit(main())
