"""Where MAE leads at x1: controlled runs of each suspect, chosen on val, confirmed on test.

Every suspect (``benchmarks/fidelity_study/suspects.py``: the EMA schedule, the latent loss's
weight, target normalisation, decoder width, pixel normalisation) is the embedded default with
one named option changed, pretrained for the presets it touches. The default's own runs are
the x1 fidelity study in ``<out>/`` (run by ``benchmarks.budget_curve`` or
``benchmarks.fidelity``); ``--with-default`` runs them here too when they are missing. All runs
share one worker pool; finished runs are reused, so rerunning continues.

    python -m benchmarks.suspects --seeds 0                       # screen every suspect on val
    python -m benchmarks.suspects --only target_layer_norm --seeds 0 1 2   # confirm one

Writes ``<out>/suspects.md`` (and each suspect's own ``fidelity.md``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.fidelity_study import multi, runs, suspects
from benchmarks.fidelity_study.budgets import BUDGETS, budget_params, runtime
from pilamim.config import ParamsError
from pilamim.io import atomic_write_text


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.suspects", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(suspects.SUSPECTS),
                    help="these suspects (default: all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--with-default", action="store_true",
                    help="also run the default's PiLaMIM and MAE where their x1 results are "
                    "missing")
    ap.add_argument("--out", default="reports")
    ap.add_argument("--work-dir", default="models/fidelity")
    ap.add_argument("--params", help="base params directory (default: the repo's params/)")
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--jobs", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    args = ap.parse_args(argv)
    args.only = args.only or list(suspects.SUSPECTS)
    args.jobs, args.threads = runtime(args.budget, args.jobs, args.threads)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = "python -m benchmarks.suspects " + shlex.join(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    sets = {suspects.DEFAULT: []} | {n: list(suspects.SUSPECTS[n].sets) for n in args.only}
    try:
        studies = {name: multi.make_study(
            budget_params(args.budget, args.params, s),
            Path(args.work_dir, args.budget if name == suspects.DEFAULT
                 else f"{args.budget}-{name}"),
            suspects.study_dir(out, name), budget=args.budget, command=command,
            # the default's runs are the x1 fidelity study's: fine-tuned as it fine-tunes them
            track=not args.no_track,
            finetuned=runs.FINETUNED if name == suspects.DEFAULT else ())
            for name, s in sets.items()}
        # suspects run by earlier invocations stay in the report: found by fingerprint alone
        earlier = {name: runs.fingerprint(multi.study_params(budget_params(
            args.budget, args.params, list(suspect.sets)), Path()))
            for name, suspect in suspects.SUSPECTS.items() if name not in studies}
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tasks: list[multi.Task] = [
        (studies[name], seed, entry) for seed in args.seeds for name in args.only
        for entry in suspects.SUSPECTS[name].entries]
    if args.with_default:
        tasks = [(studies[suspects.DEFAULT], seed, e) for seed in args.seeds
                 for e in ("pilamim", "mae")] + tasks
    if multi.refuse_clashes(tasks):
        return 2
    labels = {s.fingerprint: name for name, s in studies.items()}
    if len(labels) < len(studies):
        print("error: two suspects have the same params", file=sys.stderr)
        return 2

    def write(fresh: dict[str, set[tuple[str, int]]]) -> Path:
        mine = [s for name, s in studies.items() if name != suspects.DEFAULT]
        multi.write_study_reports(mine, args.seeds, args.jobs,
                                  {s.fingerprint: sets[labels[s.fingerprint]] for s in mine},
                                  fresh, started)
        results = {name: runs.load_results(s.out, s.fingerprint)[0]
                   for name, s in studies.items()}
        for name, fingerprint in earlier.items():
            rows = runs.load_results(suspects.study_dir(out, name), fingerprint)[0]
            if rows:
                results[name] = rows
        meta = {"command": command, "written_at": time.strftime("%Y-%m-%d %H:%M")}
        return atomic_write_text(out / "suspects.md", suspects.markdown(results, meta))

    with multi.parent_run(studies[suspects.DEFAULT], "suspects",
                          {"fidelity.suspects": " ".join(args.only), "fidelity.command": command}):
        failed, fresh = multi.run_all(tasks, args.jobs, args.threads, labels, write)
    return multi.finish(write(fresh), failed)


if __name__ == "__main__":
    raise SystemExit(main())
