"""Run the study's (seed, entry) list in one process or in ``jobs`` worker processes.

Small ViTs scale badly over CPU threads (and collapse when the cores are shared: two
OpenMP threads wait on each other for every tiny op), so on CPU the fast layout is one
single-threaded process per core. Workers are spawned inside the MLflow parent run, inherit
its env, and rebuild the study from the prepared data the main process already wrote.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import runs

_worker_study: runs.Study | None = None


@dataclass
class Outcome:
    entry: str
    seed: int
    result: dict[str, Any] | None  # None when the run failed
    error: str | None = None


def execute(study: runs.Study, todo: Sequence[tuple[int, str]], jobs: int,
            threads: int | None) -> Iterator[Outcome]:
    """Yield each run's outcome as it finishes; a failed run does not stop the others."""
    done = [(s, e) for s, e in todo if runs.result_path(study.out, e, s).exists()]
    for seed, entry in done:  # reused results need no worker
        yield _attempt(study, entry, seed)
    todo = [t for t in todo if t not in done]
    if jobs <= 1 or len(todo) <= 1:
        for seed, entry in todo:
            yield _attempt(study, entry, seed)
        return
    spec = replace(study, data=None, prepared=None)  # workers reload these themselves
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init,
                             initargs=(spec, threads)) as pool:
        futures = [pool.submit(_work, entry, seed) for seed, entry in todo]
        for future in as_completed(futures):
            yield future.result()


def _attempt(study: runs.Study, entry: str, seed: int) -> Outcome:
    try:
        return Outcome(entry, seed, runs.run(study, entry, seed))
    except Exception:  # noqa: BLE001 - reported, the study goes on with the other runs
        return Outcome(entry, seed, None, traceback.format_exc())


def _init(spec: runs.Study, threads: int | None) -> None:
    from pilamim.data.prepared import load_prepared

    from .lowlevel import load_eval_images

    global _worker_study
    if threads:
        torch.set_num_threads(threads)
    prepared = load_prepared(Path(spec.params.data.out_dir))
    data = load_eval_images(prepared, spec.params.model.img_size)
    _worker_study = replace(spec, prepared=prepared, data=data)


def _work(entry: str, seed: int) -> Outcome:
    assert _worker_study is not None, "worker not initialised"
    return _attempt(_worker_study, entry, seed)
