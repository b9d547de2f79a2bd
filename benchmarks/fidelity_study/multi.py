"""Several fidelity studies run as one: the budget curve's multipliers, the suspects' variants.

Each study keeps its own params, fingerprint, folders and ``fidelity.md``; their runs share
one pool of workers (:func:`parallel.execute_many`) and one MLflow parent run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pilamim.config import Params
from pilamim.data.prepare import prepare
from pilamim.device import resolve_device

from . import parallel, runs
from .budgets import with_paths
from .lowlevel import load_eval_images
from .output import progress_line, study_meta, write_report

Task = tuple[runs.Study, int, str]  # (study, seed, entry)


def study_params(params: Params, work: Path) -> Params:
    """The params a study of ``params`` holds (its fingerprint's input), without preparing
    anything: enough to find its results on disk."""
    return with_paths(params, work.absolute(), "shared", params.model.preset, 0)


def make_study(params: Params, work: Path, out: Path, *, budget: str, command: str,
               track: bool, finetuned: tuple[str, ...]) -> runs.Study:
    """A study of ``params`` with its data prepared under ``work`` and results in ``out``."""
    shared = study_params(params, work)
    prepared = prepare(shared.data)
    return runs.Study(params=shared, budget=budget, work=work.absolute(), out=out,
                      prepared=prepared, data=load_eval_images(prepared, params.model.img_size),
                      device=resolve_device(params.pretrain.device), command=command,
                      track=track, finetuned=finetuned)


def refuse_clashes(tasks: Sequence[Task]) -> bool:
    """Say so and return True when results JSON of planned runs were made with other study
    params (they would be mixed into a report they do not belong to)."""
    clash = [p for study, seed, entry in tasks
             for p in runs.mismatched(study.out, [(seed, entry)], study.fingerprint)]
    if clash:
        print(f"error: {len(clash)} results JSON were made with other study params (e.g. "
              f"{clash[0]}): use another --out folder, or delete them to redo those runs",
              file=sys.stderr)
    return bool(clash)


def run_all(tasks: Sequence[Task], jobs: int, threads: int | None, label: Mapping[str, str],
            after_each: Callable[[dict[str, set[tuple[str, int]]]], Any]
            ) -> tuple[list[str], dict[str, set[tuple[str, int]]]]:
    """Run (or reuse) every task; ``label`` maps a fingerprint to the name printed before its
    runs; ``after_each(fresh)`` rewrites the reports. Returns the failed runs' names and, per
    fingerprint, the (entry, seed) runs computed now (the others were reused)."""
    failed: list[str] = []
    fresh: dict[str, set[tuple[str, int]]] = {fp: set() for fp in label}
    for i, done in enumerate(parallel.execute_many(tasks, jobs, threads), 1):
        if done.result is None:
            failed.append(f"{done.entry}-seed{done.seed}")
            print(f"[{i}/{len(tasks)}] {done.entry} seed {done.seed} FAILED:\n{done.error}",
                  file=sys.stderr, flush=True)
            continue
        fp = done.result["fingerprint"]
        if not done.result["cached"]:
            fresh[fp].add((done.entry, done.seed))
        print(f"{label[fp]} {progress_line(i, len(tasks), done.result)}", flush=True)
        after_each(fresh)
    return failed, fresh


def finish(report: Path, failed: Sequence[str]) -> int:
    """The exit status of a multi-study command, saying where the report is and what failed."""
    print(f"report: {report}")
    if failed:
        print(f"{len(failed)} run(s) failed ({', '.join(failed)}); rerun the same command to "
              "retry them", file=sys.stderr)
        return 1
    return 0


def write_study_reports(studies: Sequence[runs.Study], seeds: Sequence[int], jobs: int,
                        extra_sets: Mapping[str, Sequence[str]],
                        fresh: Mapping[str, set[tuple[str, int]]], started: float) -> list[Path]:
    """Each study's own fidelity.md/json/png, from its results so far."""
    paths: list[Path] = []
    for study in studies:
        if not runs.load_results(study.out, study.fingerprint)[0]:
            continue
        args = argparse.Namespace(seeds=list(seeds), set=list(extra_sets.get(
            study.fingerprint, [])), jobs=jobs)
        # a study filled by several invocations (this one plans only some entries) has no
        # single planned count
        meta = {**study_meta(study, args, started), "expected_runs": None}
        paths += write_report(study, meta, started, fresh.get(study.fingerprint, set()))
    return paths


@contextlib.contextmanager
def parent_run(study: runs.Study, name: str, tags: Mapping[str, str]) -> Iterator[None]:
    """One MLflow parent run; every run of every study becomes its child (through the env)."""
    if not study.track:
        yield
        return
    from pilamim.tracking.runs import pipeline_run

    with pipeline_run(study.params, run_name=name, extra_tags=dict(tags)):
        yield
