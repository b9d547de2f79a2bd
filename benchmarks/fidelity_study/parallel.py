"""Run the study's (seed, entry) list in one process or in ``jobs`` worker processes.

Small ViTs scale badly over CPU threads (and collapse when the cores are shared: two
OpenMP threads wait on each other for every tiny op), so on CPU the fast layout is one
single-threaded process per core. Workers are spawned inside the MLflow parent run, inherit
its env, and rebuild the study from the prepared data the main process already wrote.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import runs

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# data folder, img_size -> (prepared data, eval images) in this worker
_worker_data: dict[tuple[str, int], tuple[Any, Any]] = {}


@dataclass
class Outcome:
    entry: str
    seed: int
    result: dict[str, Any] | None  # None when the run failed
    error: str | None = None


def execute(study: runs.Study, todo: Sequence[tuple[int, str]], jobs: int,
            threads: int | None) -> Iterator[Outcome]:
    """Yield each run's outcome as it finishes; a failed run does not stop the others."""
    yield from execute_many([(study, seed, entry) for seed, entry in todo], jobs, threads)


def execute_many(tasks: Sequence[tuple[runs.Study, int, str]], jobs: int,
                 threads: int | None) -> Iterator[Outcome]:
    """:func:`execute` over runs of several studies (the budget curve's multipliers) in one
    pool, so a worker that finishes early takes the next study's run instead of idling."""
    done = [t for t in tasks if runs.result_path(t[0].out, t[2], t[1]).exists()]
    for study, seed, entry in done:  # reused results need no worker
        yield _attempt(study, entry, seed)
    tasks = [t for t in tasks if t not in done]
    if jobs <= 1 or len(tasks) <= 1:
        for study, seed, entry in tasks:
            yield _attempt(study, entry, seed)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init,
                             initargs=(threads,)) as pool:
        # workers reload the prepared data and eval images themselves (once per data folder)
        futures = [pool.submit(_work, replace(study, data=None, prepared=None), entry, seed)
                   for study, seed, entry in tasks]
        for future in as_completed(futures):
            yield future.result()


def _attempt(study: runs.Study, entry: str, seed: int) -> Outcome:
    try:
        return Outcome(entry, seed, runs.run(study, entry, seed))
    except Exception:  # noqa: BLE001 - reported, the study goes on with the other runs
        return Outcome(entry, seed, None, traceback.format_exc())


def _init(threads: int | None) -> None:
    die_with_parent()
    if threads:
        torch.set_num_threads(threads)


def die_with_parent() -> None:
    """Have Linux kill this worker when the study process dies. A worker that outlived a killed
    study would go on training its run while the restarted study trains the same run (same
    checkpoint folder), and hold a core the new workers need."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        return  # not fatal: the study still works, only the clean-up on a kill is lost
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _work(spec: runs.Study, entry: str, seed: int) -> Outcome:
    return _attempt(_loaded(spec), entry, seed)


def _loaded(spec: runs.Study) -> runs.Study:
    """``spec`` with its prepared data and eval images, loaded once per worker and folder."""
    from pilamim.data.prepared import load_prepared

    from .lowlevel import load_eval_images

    key = (spec.params.data.out_dir, spec.params.model.img_size)
    if key not in _worker_data:
        prepared = load_prepared(Path(key[0]))
        _worker_data[key] = (prepared, load_eval_images(prepared, key[1]))
    prepared, data = _worker_data[key]
    return replace(spec, prepared=prepared, data=data)
