"""Budget curve: the fidelity study at x1, x2, x4, x8 the embedded default's pretraining steps.

Does PiLaMIM overtake MAE with a longer schedule, and where does the linear probe cross raw
pixels? Each multiplier k is a fidelity study of its own (``pretrain.epochs`` x k, the rest
the embedded default, so the lr, warm-up and EMA schedules stretch with it), in its own
folder: x1 is ``<out>/`` (the fidelity study, ``fidelity.md``), k > 1 is
``<out>/budget_x<k>/``. All runs share one pool of workers, in the order that answers the
question first: every budget of seed 0, then seed 1, and so on. The floors (random init, raw
pixels) do not depend on the budget and run at x1 only. A finished run is reused (its
results JSON), a killed pretraining resumes from its checkpoint, so rerunning the same
command continues a study; ``--report-only`` rewrites the reports from what is on disk.

    python -m benchmarks.budget_curve --multipliers 1 2 4 8 --entries pilamim mae --seeds 0 1 2

Writes ``<out>/budget_curve.md``, ``.json`` and ``.png`` (and each study's fidelity.md).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.fidelity_study import curve, multi, runs
from benchmarks.fidelity_study.budgets import BUDGETS, budget_params, runtime
from pilamim.config import Params, ParamsError
from pilamim.io import atomic_write_json, atomic_write_text


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.budget_curve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--multipliers", type=int, nargs="+", default=[1, 2, 4, 8],
                    help="pretraining steps as multiples of the embedded default's")
    ap.add_argument("--entries", nargs="+", choices=runs.PRESETS, default=["pilamim", "mae"],
                    help="presets to pretrain at every multiplier")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-floors", action="store_true",
                    help="skip the random-init and raw-pixel floors (run at x1)")
    ap.add_argument("--finetune-all", action="store_true",
                    help="fine-tune at every multiplier (default: at x1 only, as the fidelity "
                    "study does; fine-tuning costs as much as a x1 pretraining)")
    ap.add_argument("--out", default="reports")
    ap.add_argument("--work-dir", default="models/fidelity",
                    help="models and prepared data: <work-dir>/cpu for x1, cpu-x<k> for k > 1")
    ap.add_argument("--params", help="base params directory (default: the repo's params/)")
    ap.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE",
                    help="override a param at every multiplier")
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu",
                    help="the x1 study: micro (tests), cpu (the embedded default), gpu (ViT-S)")
    ap.add_argument("--jobs", type=int, help="worker processes (default: the budget's)")
    ap.add_argument("--threads", type=int, help="torch threads per process (default: the "
                    "budget's)")
    ap.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing; rewrite the reports from the results on disk")
    args = ap.parse_args(argv)
    if 1 not in args.multipliers:
        ap.error("--multipliers must include 1 (the floors and the reference budget)")
    args.jobs, args.threads = runtime(args.budget, args.jobs, args.threads)
    return args


def studies(args: argparse.Namespace, command: str) -> dict[int, runs.Study]:
    """One prepared study per multiplier (its own params, fingerprint and folders)."""
    base = budget_params(args.budget, args.params, args.set)
    return {k: multi.make_study(
                base if k == 1 else budget_params(args.budget, args.params, _sets(args, base, k)),
                Path(args.work_dir, args.budget if k == 1 else f"{args.budget}-x{k}"),
                curve.study_dir(Path(args.out), k), budget=args.budget, command=command,
                track=not args.no_track,
                finetuned=runs.FINETUNED if k == 1 or args.finetune_all else ())
            for k in sorted(set(args.multipliers))}


def _sets(args: argparse.Namespace, base: Params, k: int) -> list[str]:
    return [*args.set] + ([] if k == 1 else [f"pretrain.epochs={base.pretrain.epochs * k}"])


def plan(args: argparse.Namespace, by_k: dict[int, runs.Study]) -> list[multi.Task]:
    """Seed-major: every budget of seed 0 first, so a stopped study already has a curve."""
    tasks = []
    for seed in args.seeds:
        for k in sorted(by_k):
            entries = list(args.entries)
            if k == curve.FLOORS_AT and not args.no_floors:
                entries += list(runs.FLOORS)
            tasks += [(by_k[k], seed, e) for e in entries]
    return tasks


def write_reports(args: argparse.Namespace, by_k: dict[int, runs.Study], command: str,
                  started: float, fresh: dict[str, set[tuple[str, int]]]) -> list[Path]:
    """Each study's fidelity.md (its runs so far) and the curve across them."""
    base = by_k[1].params
    paths = multi.write_study_reports(
        list(by_k.values()), args.seeds, args.jobs,
        {s.fingerprint: _sets(args, base, k) for k, s in by_k.items()}, fresh, started)
    results = {k: runs.load_results(s.out, s.fingerprint)[0] for k, s in by_k.items()}
    pts = curve.points(results, args.entries)
    floor = curve.floors(results.get(curve.FLOORS_AT, []))
    meta = {"command": command, "written_at": time.strftime("%Y-%m-%d %H:%M"),
            "threads": args.threads, "seeds": args.seeds,
            "studies": {k: {"folder": str(s.out), "fingerprint": s.fingerprint,
                            "runs": len(results[k]), "epochs": s.params.pretrain.epochs}
                        for k, s in by_k.items()}}
    out = Path(args.out)
    return [atomic_write_text(out / "budget_curve.md", curve.markdown(pts, floor, meta)),
            atomic_write_json(out / "budget_curve.json", curve.to_json(pts, floor, meta)),
            curve.chart(pts, floor, out / "budget_curve.png"), *paths]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = "python -m benchmarks.budget_curve " + shlex.join(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        by_k = studies(args, command)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tasks = [] if args.report_only else plan(args, by_k)
    if multi.refuse_clashes(tasks):
        return 2
    tags = {"fidelity.curve": " ".join(f"x{k}" for k in by_k),
            "fidelity.seeds": " ".join(map(str, args.seeds)), "fidelity.command": command}
    with multi.parent_run(by_k[1], "budget-curve", tags):
        failed, fresh = multi.run_all(
            tasks, args.jobs, args.threads, {s.fingerprint: f"x{k}" for k, s in by_k.items()},
            lambda fresh: write_reports(args, by_k, command, started, fresh))
    return multi.finish(write_reports(args, by_k, command, started, fresh)[0], failed)


if __name__ == "__main__":
    raise SystemExit(main())
