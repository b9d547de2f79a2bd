"""The Prefect flow ``pilamim-pipeline``: every stage as a task, each run as ``dvc repro`` runs it.

    fetch -> prepare -> pretrain -> probe -> finetune -> register

Stages are written once (``pilamim/stages/``, run by ``pilamim <stage>``) and described once, in
the stage table (:mod:`pilamim.stages`), whose :func:`~pilamim.stages.waves` give the order. A
task here starts its stage and records the outcome; everything else belongs to DVC or the stage:

* **DVC decides and records.** In a DVC repo a task asks DVC to reproduce its one stage
  (``Repo.reproduce``: ``dvc repro --single-item --no-run-cache <stage>``). DVC skips it when its
  code, deps, params and outs match ``dvc.lock`` (the task then returns the stage's existing
  metrics, marked ``skipped``), else runs the stage's ``cmd`` from ``dvc.yaml`` in a process of
  its own (own RNGs and thread pool: results equal a plain ``dvc repro``) and records it in
  ``dvc.lock``. The flow and ``dvc repro`` are two entrances to one cache. No run cache: a stage
  whose inputs changed runs, so ``register`` writes the Model Registry whenever it reports
  having done so (a ``metrics/register.json`` restored from the run cache would describe a
  registration the registry has since moved on from). ``force=True`` runs every stage. Outside
  a DVC repo the task runs the same command itself.
* **One stage at a time.** DVC takes its repo lock for each ``reproduce``, and on the 2-core
  machines this pipeline is tested on, probe and fine-tune side by side were slower than in turn
  (72 s against 56 s: each got one core instead of two); they run in turn.
* **Params live in files.** DVC reads ``params/*.yaml``, and so do the stage commands: with
  ``params=None`` they are loaded from ``params_dir``; a ``Params`` given to the flow (from the
  Prefect UI, a deployment or ``pilamim run --set``) that differs from the files is written there
  first (:func:`pilamim.params_files.dump_params`, which rewrites the files without their
  comments). In a DVC repo that folder must be ``params/``, the one ``dvc.yaml`` names.
* **Retries only for transient failures.** The stage command exits with
  :data:`pilamim.cli.EXIT_TRANSIENT` when the tracking server, the network, S3 or a lock failed
  (it judges the exception's type, :func:`pilamim.cli.is_transient`); those tasks are retried
  after 10 s and 60 s, as is one that met DVC's lock held by another ``dvc`` process. Bad params,
  missing inputs and bugs fail at once.
* **What a stage reports.** DVC lets a command's output go to the terminal, so the stage command
  writes its outcome (exit code and error, or its result with its MLflow run id) to the file env
  ``PILAMIM_REPORT_FILE`` names (:func:`pilamim.cli.report`) instead of onto the flow's stdout.
* **MLflow.** The flow runs inside :func:`pilamim.tracking.runs.pipeline_run` (the parent run);
  every stage run is its child (env ``PILAMIM_PARENT_RUN_ID``, inherited by the stage processes)
  and carries this flow run's and task run's Prefect ids (env ``PILAMIM_RUN_TAGS``): tracking
  itself does not import Prefect.
* **One run per checkout** (:mod:`pilamim.checkout_lock`). The flow holds the working directory
  from before it touches ``params/`` to its end; the stage commands DVC starts carry its token and
  join it, while another ``pilamim run``, stage command or ``dvc repro`` there is refused.
* **Summary.** A markdown artifact ``pilamim-pipeline-summary`` (Artifacts page of the Prefect
  UI): metrics table, promotion decision and reason, MLflow runs, which stages ran or were
  skipped. The flow returns the same facts as a dict (:mod:`pilamim_flows.summary`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pilamim_flows.summary import ARTIFACT_KEY, publish, summarize
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run, task_run

from pilamim.checkout_lock import hold_checkout
from pilamim.cli import ENV_REPORT_FILE, EXIT_TRANSIENT, is_transient
from pilamim.config import Params, ParamsError
from pilamim.params_files import dump_params, load_params
from pilamim.stages import STAGES, stage, waves

FLOW_NAME = "pilamim-pipeline"
RETRIES = 2
RETRY_DELAYS_S = [10, 60]
DVC_PARAMS_DIR = "params"  # where dvc.yaml's stages read their params

__all__ = ["ARTIFACT_KEY", "FLOW_NAME", "STAGE_TASKS", "StageFailed", "pilamim_pipeline",
           "run_stage"]


class StageFailed(RuntimeError):
    """A stage command failed; ``returncode`` says how (:mod:`pilamim.cli`), None if unknown."""

    def __init__(self, stage: str, returncode: int | None, error: str) -> None:
        super().__init__(stage, returncode, error)  # as args, so it pickles into a task state
        self.stage, self.returncode, self.error = stage, returncode, error

    def __str__(self) -> str:
        code = "" if self.returncode is None else f" (exit code {self.returncode})"
        return self.error + code


# ----------------------------------------------------------------------------- one stage


def is_dvc_repo(root: str | Path = ".") -> bool:
    """True when ``root`` itself is a DVC repo (has ``.dvc/``) with a ``dvc.yaml`` pipeline."""
    return (Path(root) / ".dvc").is_dir() and (Path(root) / "dvc.yaml").is_file()


def reproduce(name: str, params_dir: str, force: bool, env: dict[str, str]) -> bool:
    """Run stage ``name`` as ``dvc repro`` would, its command seeing ``env`` on top of ours;
    False when DVC found it up to date. Outside a DVC repo: run the command, always."""
    if not is_dvc_repo():
        subprocess.run([sys.executable, "-m", "pilamim.cli", name, "--params", params_dir],
                       env={**os.environ, **env}, check=True)
        return True
    from dvc.repo import Repo

    with Repo(".") as repo, _dvc_progress_only():
        return bool(repo.reproduce(name, single_item=True, force=force, run_cache=False,
                                   run_env=env))


@contextlib.contextmanager
def _dvc_progress_only() -> Iterator[None]:
    """Of DVC's INFO lines (Prefect's handler prints them), keep "Running stage 'x': > pilamim
    x", which says what runs now, and drop the bookkeeping: "Updating lock file" and blank
    lines, four a stage."""
    quiet, progress = logging.getLogger("dvc"), logging.getLogger("dvc.stage.run")
    levels = quiet.level, progress.level
    quiet.setLevel(logging.WARNING)
    progress.setLevel(logging.INFO)
    try:
        yield
    finally:
        quiet.setLevel(levels[0])
        progress.setLevel(levels[1])


def stage_env(report_file: Path) -> dict[str, str]:
    """What a stage command gets from the task besides the flow's environment (which already
    holds the parent run id and the checkout token): where to report, the Prefect ids to tag
    its MLflow run with, and this interpreter's scripts first on ``PATH``, so ``dvc.yaml``'s
    ``pilamim`` is the one the flow runs with even when its virtualenv is not activated."""
    from pilamim.tracking.runs import ENV_RUN_TAGS

    bin_dir = str(Path(sys.executable).parent)
    return {ENV_REPORT_FILE: str(report_file), ENV_RUN_TAGS: json.dumps(_prefect_tags()),
            "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


def read_report(path: Path) -> dict[str, Any]:
    """The outcome a stage command wrote (:func:`pilamim.cli.report`); {} when it wrote none
    (DVC skipped it or restored its outputs from the cache, or it was killed)."""
    try:
        outcome = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return outcome if isinstance(outcome, dict) else {}


def stage_failure(name: str, outcome: dict[str, Any], err: Exception) -> StageFailed:
    """The task's error: the command's own exit code and message when it reported a failure,
    else DVC's or the subprocess's error (transient when it is DVC's lock, say)."""
    if outcome.get("exit_code"):
        return StageFailed(name, outcome["exit_code"], f"pilamim {name}: {outcome.get('error')}")
    code = EXIT_TRANSIENT if is_transient(err) else getattr(err, "returncode", None)
    return StageFailed(name, code, f"{name}: {type(err).__name__}: {err}")


def retry_transient(task_: Any, task_run_: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a stage only when it failed transiently."""
    err = state.result(raise_on_failure=False)
    return isinstance(err, StageFailed) and err.returncode == EXIT_TRANSIENT


def read_metrics(name: str, params: Params) -> dict[str, Any]:
    """The scalars of a stage's metrics JSON (``{}`` when it has none or it is missing)."""
    path = stage(name).metrics_file(params)
    try:
        values = json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in values.items() if v is None or isinstance(v, str | int | float)}


def _prefect_tags() -> dict[str, str]:
    """This flow/task run's Prefect ids as MLflow tags (only the ids that exist here)."""
    from pilamim.tracking import runs

    ids = {runs.TAG_PREFECT_FLOW_RUN: flow_run.get_id(),
           runs.TAG_PREFECT_TASK_RUN: task_run.get_id()}
    return {key: str(value) for key, value in ids.items() if value}


@task(persist_result=True, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS_S,
      retry_condition_fn=retry_transient)
def run_stage(name: str, params: Params, params_dir: str = DVC_PARAMS_DIR,
              force: bool = False) -> dict[str, Any]:
    """Reproduce stage ``name``; returns what it produced.

    ``{"stage", "skipped", "metrics", "mlflow_run_id", "seconds"}``; ``metrics`` are the scalars
    of the stage's metrics JSON (read the same way whether it ran or was up to date).
    """
    logger = get_run_logger()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"pilamim-{name}-") as tmp:
        report_file = Path(tmp) / "report.json"
        try:
            ran = reproduce(name, params_dir, force, stage_env(report_file))
        except Exception as err:
            raise stage_failure(name, read_report(report_file), err) from err
        result = read_report(report_file).get("result") or {}
    seconds = time.perf_counter() - start
    if ran:
        logger.info("%s finished in %.1f s (MLflow run %s)", name, seconds,
                    result.get("mlflow_run_id"))
    else:
        logger.info("%s is up to date in dvc.lock: skipped", name)
    return {"stage": name, "skipped": not ran, "metrics": read_metrics(name, params),
            "mlflow_run_id": result.get("mlflow_run_id"), "seconds": seconds}


STAGE_TASKS = {s: run_stage.with_options(name=s, task_run_name=s) for s in STAGES}


# ----------------------------------------------------------------------------- params


def sync_params(params: Params | None, params_dir: str | Path) -> Params:
    """The run's params, with ``params_dir`` holding exactly them (the stage commands and DVC
    read the files).

    ``None``: load the files. Given params that differ from the files (or no valid files):
    write them there first. In a DVC repo ``params_dir`` must be the folder ``dvc.yaml`` reads.
    """
    if is_dvc_repo() and Path(params_dir).resolve() != Path(DVC_PARAMS_DIR).resolve():
        raise ValueError(f"params_dir {str(params_dir)!r}: in a DVC repo the stages read "
                         f"{DVC_PARAMS_DIR}/ (dvc.yaml), so the flow must use that folder too")
    if params is None:
        return load_params(params_dir)
    try:
        on_disk: Params | None = load_params(params_dir)
    except ParamsError:
        on_disk = None
    if on_disk != params:
        dump_params(params, params_dir)
    return params


# ----------------------------------------------------------------------------- the flow


@flow(name=FLOW_NAME, persist_result=True)
def pilamim_pipeline(params: Params | None = None, params_dir: str = DVC_PARAMS_DIR,
                     force: bool = False) -> dict[str, Any]:
    """Every stage in the stage table's order (:func:`pilamim.stages.waves`): fetch -> prepare
    -> pretrain -> probe -> finetune -> register, each skipped when DVC reports it up to date.

    Args:
        params: every params group; None reads ``params_dir``. Given params are written to
            ``params_dir`` first when they differ (the stages read the files).
        params_dir: folder of ``<group>.yaml`` files (relative to the working directory, the
            repository root); in a DVC repo, ``params``.
        force: run every stage even when DVC reports it up to date.
    """
    with hold_checkout():  # before sync_params: it may rewrite params/ for this run
        return _run_pipeline(params, params_dir, force)


def _run_pipeline(params: Params | None, params_dir: str, force: bool) -> dict[str, Any]:
    """The flow's body, run while this process holds the checkout."""
    from pilamim.tracking import runs

    params = sync_params(params, params_dir)
    logger = get_run_logger()
    outcomes: dict[str, dict[str, Any]] = {}
    with runs.pipeline_run(params, extra_tags=_prefect_tags()) as pipeline:
        logger.info("MLflow pipeline run %s (experiment %s)", pipeline.run_id,
                    pipeline.experiment_id)
        try:
            for name in (s for wave in waves() for s in wave):
                outcomes[name] = STAGE_TASKS[name](name, params, params_dir, force)
        except Exception as err:
            summary = summarize(outcomes, pipeline, "failed", f"{type(err).__name__}: {err}")
            try:
                publish(summary, outcomes)
            except Exception as publish_err:  # noqa: BLE001 - the stage's error matters more
                logger.warning("could not publish the run summary: %s", publish_err)
            raise
        summary = summarize(outcomes, pipeline)
        pipeline.set_tags({"pilamim.stages_ran": ",".join(summary["ran"]) or "none"})
        publish(summary, outcomes)
    return summary
