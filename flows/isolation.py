"""Run a stage in its own Python process: own RNGs, thread pool and MLflow run stack."""

from __future__ import annotations

import itertools
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pilamim_flows.retry import exception_chain

from pilamim.checkout_lock import held_lock_fds
from pilamim.config import Params


class StageProcessError(RuntimeError):
    """A stage process ended without reporting a result (killed, out of memory, crashed)."""


_CHILD_CODE = ("import sys; from pilamim_flows.isolation import _stage_process; "
               "_stage_process(*sys.argv[1:])")


def execute_isolated(stage: str, params: Params, threads: int | None = None) -> dict[str, Any]:
    """``runner.execute(stage, params)`` in a fresh Python process; its result or its error.

    Own process = own RNGs, own torch thread pool, own MLflow run stack, so two stages running
    at once give exactly what each gives alone. The process inherits this one's environment
    (MLflow URI, parent-run id), working directory and ``sys.path``. A plain subprocess, not
    ``multiprocessing``: spawn re-imports the caller's ``__main__``, which breaks scripts that
    call the flow without an ``if __name__ == "__main__"`` guard. Errors come back as
    themselves, with their ``__cause__`` chain, so :func:`is_transient` can judge them.
    """
    with tempfile.TemporaryDirectory(prefix=f"pilamim-{stage}-") as tmp:
        job, reply = Path(tmp) / "job.pkl", Path(tmp) / "reply.pkl"
        job.write_bytes(pickle.dumps((stage, params, threads)))
        # -P + PYTHONPATH = exactly this process's sys.path ('' is the working directory)
        path = os.pathsep.join(p or os.getcwd() for p in sys.path)
        env = {**os.environ, "PYTHONPATH": path}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        # the child shares the checkout lock: killed alone, this process leaves it held
        done = subprocess.run([sys.executable, "-P", "-c", _CHILD_CODE, str(job), str(reply)],
                              env=env, pass_fds=held_lock_fds())
        if not reply.exists():
            raise StageProcessError(f"the {stage} process exited with code {done.returncode} "
                                    "before reporting a result (killed? out of memory?)")
        ok, value = pickle.loads(reply.read_bytes())
    if ok:
        return value
    for err, cause in itertools.pairwise(value):
        err.__cause__ = cause
    raise value[0]


def _stage_process(job: str, reply: str) -> None:
    """Child side of :func:`execute_isolated`: run the stage, pickle its result or errors."""
    stage, params, threads = pickle.loads(Path(job).read_bytes())
    if threads:
        import torch

        torch.set_num_threads(threads)
    from pilamim.stages.runner import execute

    try:
        answer: tuple[bool, Any] = (True, execute(stage, params))
    except Exception as err:  # noqa: BLE001 - sent back to the parent, raised there
        answer = (False, [_picklable(e) for e in exception_chain(err)])
    Path(reply + ".tmp").write_bytes(pickle.dumps(answer))
    os.replace(reply + ".tmp", reply)


def _picklable(err: BaseException) -> BaseException:
    try:
        return pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001 - keep type name and message at least
        return RuntimeError(f"{type(err).__name__}: {err}")


# Below this many threads each, two CPU-bound stages are better run one after the other with
# all cores each: on 2 cores, probe + a 2-epoch fine-tune took 72 s side by side (1 thread
# each, or 2 each: oversubscribed) and 56 s in turn with 2 threads each; a fine-tune epoch
# takes 32 s on 1 thread and 16 s on 2 (docs/METHOD.md, "How the embedded recipe was measured").
MIN_THREADS_PER_STAGE = 4


def stage_slots(stages: int, cores: int | None = None) -> tuple[int, int]:
    """(how many of ``stages`` run at once, threads each) on this machine's cores.

    Concurrency pays only when each stage still gets a useful thread pool; otherwise the
    stages run in turn and each gets every core, so none straggles on half the machine.
    """
    if cores is None:
        cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count()) or 1
    at_once = max(1, min(stages, cores // MIN_THREADS_PER_STAGE))
    return at_once, max(1, cores // at_once)
