"""The Prefect flow ``pilamim-pipeline``: every stage as a task, skipping what DVC says is done.

    fetch -> prepare -> pretrain -> (probe | finetune, concurrently) -> register

Stages are written once (``pilamim/stages/``); a task here only decides *whether* a stage runs
and records the outcome:

* **Skip what is up to date.** Before a stage runs, the task asks DVC
  (:func:`flows.dvc_state.stage_up_to_date`: the stage's deps, params and outs match
  ``dvc.lock``). If so, the task returns the stage's existing metrics marked ``skipped``. After a
  stage ran, :func:`flows.dvc_state.commit_stage` records it in ``dvc.lock``, so ``dvc repro``
  then finds nothing to do either — the flow and ``dvc repro`` are two entrances to one cache.
  ``force=True`` runs every stage. Outside a DVC repo every stage runs.
* **Params live in files.** DVC reads ``params/*.yaml``, so the flow does too: with
  ``params=None`` they are loaded from ``params_dir``; a ``Params`` given to the flow (from the
  Prefect UI, a deployment or ``pilamim run --set``) that differs from the files is written
  there first (:func:`pilamim.config.dump_params`, which rewrites the files without their
  comments), so DVC's view of the params and the flow's never disagree.
* **Persisted results, cached within one flow run only.** Tasks persist their results
  (``persist_result=True``; Prefect 3 stores a result under its cache key, so ``NO_CACHE``
  would silently persist nothing). The key (:func:`stage_cache_key`) is content, not live
  objects: stage name + hash of the stage's validated params groups + the flow-run id. A
  retried flow run (same id) therefore reuses the stages it already finished; a new flow run
  never hits the Prefect cache and asks DVC instead. Caching across runs would be a second,
  weaker copy of DVC's check: keyed on params and ``dvc.lock`` it would return a stale result
  after someone deleted or edited a stage's outputs; keyed on output content it would
  re-implement DVC's hashing. DVC stays the single judge of "done".
* **Retries only for transient failures** (:func:`is_transient`): unreachable tracking server,
  connection errors and timeouts, S3 endpoint errors, SQLite "database is locked", DVC's lock.
  Bad params, missing inputs and other bugs fail at once.
* **probe and finetune run concurrently**, each in its own Python process
  (:func:`execute_isolated`). In one process the two trainings would share torch's, numpy's and
  Python's global RNGs (dropout, drop path, Mixup, RandAugment draw from them), so their results
  would depend on thread timing and differ from a sequential ``dvc repro``. DVC bookkeeping stays
  in this process, where :mod:`flows.dvc_state` serialises it, so the two never meet DVC's lock.
* **MLflow.** The flow runs inside :func:`pilamim.tracking.pipeline_run` (the parent run); every
  stage run is its child (env ``PILAMIM_PARENT_RUN_ID``, inherited by the stage processes) and
  is tagged with the Prefect flow-run and task-run ids.
* **Summary.** A markdown artifact ``pilamim-pipeline-summary`` (Artifacts page of the Prefect
  UI): metrics table, promotion decision and reason, MLflow runs, which stages ran or were
  skipped. The flow returns the same facts as a dict.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import pickle
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import wait
from prefect.runtime import flow_run, task_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows import dvc_state
from pilamim.config import Params, ParamsError, dump_params, load_params
from pilamim.stages import STAGE_GROUPS, STAGES

FLOW_NAME = "pilamim-pipeline"
ARTIFACT_KEY = "pilamim-pipeline-summary"
SEQUENTIAL = ("fetch", "prepare", "pretrain")
CONCURRENT = ("probe", "finetune")     # both only read prepare's and pretrain's outputs
FINAL = "register"
RETRIES = 2
RETRY_DELAYS_S = [10, 60]

# (stage, key in its metrics JSON, label) for the summary's metrics table.
SUMMARY_METRICS = (
    ("pretrain", "val_loss", "pretrain loss (val, fixed mask)"),
    ("pretrain", "val_loss_pixel", "pretrain pixel loss (val)"),
    ("pretrain", "val_loss_latent", "pretrain latent loss (val)"),
    ("probe", "top1", "linear probe top-1"),
    ("probe", "top5", "linear probe top-5"),
    ("probe", "knn_top1", "kNN top-1"),
    ("finetune", "top1", "fine-tune top-1"),
    ("finetune", "top5", "fine-tune top-5"),
)


# ----------------------------------------------------------------------------- retry policy


_TRANSIENT_MESSAGES = ("database is locked", "unable to acquire lock", "temporarily unavailable",
                       "connection reset", "connection refused", "connection aborted",
                       "max retries exceeded", "timed out")


def _transient_types() -> tuple[type[BaseException], ...]:
    from pilamim.tracking import TrackingUnavailable

    types: list[type[BaseException]] = [TrackingUnavailable, ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import requests

        types += [requests.ConnectionError, requests.Timeout]
    with contextlib.suppress(ImportError):
        import botocore.exceptions as boto

        types += [boto.EndpointConnectionError, boto.ConnectTimeoutError,
                  boto.ReadTimeoutError, boto.ConnectionClosedError]
    with contextlib.suppress(ImportError):
        import urllib3.exceptions as u3

        types += [u3.NewConnectionError, u3.MaxRetryError, u3.TimeoutError]
    with contextlib.suppress(ImportError):
        from dvc.lock import LockError

        types.append(LockError)
    return tuple(types)


def _permanent_types() -> tuple[type[BaseException], ...]:
    from pilamim.stages.runner import MissingInputError

    return ParamsError, MissingInputError, ValueError, TypeError, KeyError


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_transient(err: BaseException) -> bool:
    """True when retrying the stage may succeed: the error (or its cause) is about the network,
    a server or a lock, not about params, inputs or code.

    The error itself decides first: a ParamsError or MissingInputError is permanent even when
    raised while handling a network error.
    """
    if isinstance(err, _permanent_types()) and not isinstance(err, _transient_types()):
        return False
    transient = _transient_types()
    for link in _chain(err):
        if isinstance(link, transient):
            return True
        # MLflow wraps store and HTTP failures in MlflowException; SQLite reports its lock as
        # an OperationalError: only their message tells a lock or an outage from a bug.
        wrapper = type(link).__name__ == "MlflowException"
        if wrapper or isinstance(link, sqlite3.OperationalError | RuntimeError | OSError):
            text = str(link).lower()
            if any(m in text for m in _TRANSIENT_MESSAGES):
                return True
    return False


def retry_transient(task_: Any, task_run_: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed stage only when :func:`is_transient`."""
    try:
        state.result()
    except Exception as err:  # noqa: BLE001 - classify whatever the stage raised
        return is_transient(err)
    return False


# ----------------------------------------------------------------------------- stage execution


class StageProcessError(RuntimeError):
    """A stage process ended without reporting a result (killed, out of memory, crashed)."""


_CHILD_CODE = "import sys; from flows.pipeline import _stage_process; _stage_process(*sys.argv[1:])"


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
        done = subprocess.run([sys.executable, "-P", "-c", _CHILD_CODE, str(job), str(reply)],
                              env=env)
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
        answer = (False, [_picklable(e) for e in _chain(err)])
    Path(reply + ".tmp").write_bytes(pickle.dumps(answer))
    os.replace(reply + ".tmp", reply)


def _picklable(err: BaseException) -> BaseException:
    try:
        return pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001 - keep type name and message at least
        return RuntimeError(f"{type(err).__name__}: {err}")


def _threads_per_process(concurrent: int) -> int:
    """Split this machine's cores between the concurrent stage processes (at least 1 each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // concurrent)


def metrics_path(stage: str, params: Params) -> Path | None:
    """Where a stage writes its metrics JSON (None for stages without one)."""
    group = getattr(params, stage, None)
    path = getattr(group, "metrics_path", None)
    if path:
        return Path(path)
    if stage == "prepare":
        return Path(params.data.out_dir) / "dataset.json"
    return None


def read_metrics(stage: str, params: Params) -> dict[str, Any]:
    """The scalars of a stage's metrics JSON (``{}`` when it has none or it is missing)."""
    path = metrics_path(stage, params)
    if path is None or not path.exists():
        return {}
    try:
        return _scalars(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _scalars(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if v is None or isinstance(v, str | int | float | bool)}


def _tag_prefect_ids(run_id: str | None) -> None:
    """Tag a stage run made in a child process with this flow/task run's Prefect ids."""
    if not run_id:
        return
    from pilamim import tracking

    ids = {tracking.TAG_PREFECT_FLOW_RUN: flow_run.get_id(),
           tracking.TAG_PREFECT_TASK_RUN: task_run.get_id()}
    try:
        client, _ = tracking.connect(check=False)
        for key, value in ids.items():
            if value:
                client.set_tag(run_id, key, str(value))
    except Exception as err:  # noqa: BLE001 - lineage tags are best effort
        get_run_logger().warning("could not tag MLflow run %s with Prefect ids: %s", run_id, err)


def stage_cache_key(context: Any, inputs: dict[str, Any]) -> str:
    """Prefect cache/result key: stage + its params' content + this flow run (+ force).

    Content, not objects: the validated values of the params groups the stage reads (the same
    groups DVC lists as its ``params``), hashed as canonical JSON.
    """
    stage, params = inputs["stage"], inputs["params"]
    values = {g: getattr(params, g).model_dump(mode="json") for g in STAGE_GROUPS[stage]}
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
    run = context.task_run.flow_run_id or context.task_run.id
    force = "-force" if inputs.get("force") else ""
    return f"pilamim-{stage}-{digest}-{run}{force}"


@task(persist_result=True, cache_key_fn=stage_cache_key, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=retry_transient)
def run_stage(stage: str, params: Params, force: bool = False, isolate: bool = False,
              threads: int | None = None) -> dict[str, Any]:
    """Run one stage unless DVC says it is up to date; returns what it produced.

    ``{"stage", "skipped", "metrics", "mlflow_run_id", "seconds"}``; ``metrics`` are the scalar
    results (a skipped stage's come from its metrics JSON).
    """
    logger = get_run_logger()
    if not force and dvc_state.stage_up_to_date(stage):
        logger.info("%s is up to date in dvc.lock: skipped", stage)
        return {"stage": stage, "skipped": True, "metrics": read_metrics(stage, params),
                "mlflow_run_id": None, "seconds": 0.0}
    start = time.perf_counter()
    if isolate:
        result = execute_isolated(stage, params, threads)
        _tag_prefect_ids(result.get("mlflow_run_id"))
    else:
        from pilamim.stages.runner import execute

        result = execute(stage, params)
    dvc_state.commit_stage(stage)
    seconds = time.perf_counter() - start
    logger.info("%s finished in %.1f s (MLflow run %s)", stage, seconds,
                result.get("mlflow_run_id"))
    return {"stage": stage, "skipped": False, "metrics": _scalars(result),
            "mlflow_run_id": result.get("mlflow_run_id"), "seconds": seconds}


STAGE_TASKS = {s: run_stage.with_options(name=s, task_run_name=s) for s in STAGES}


# ----------------------------------------------------------------------------- params


def sync_params(params: Params | None, params_dir: str | Path) -> Params:
    """The run's params, with ``params_dir`` holding exactly them (DVC reads the files).

    ``None``: load the files. Given params that differ from the files (or no valid files):
    write them there first, so ``dvc status`` judges the stages with the params that run.
    """
    if params is None:
        return load_params(params_dir)
    try:
        on_disk: Params | None = load_params(params_dir)
    except ParamsError:
        on_disk = None
    if on_disk != params:
        dump_params(params, params_dir)
    return params


# ----------------------------------------------------------------------------- summary


def _link(run_id: str | None, experiment_id: str) -> str:
    if not run_id:
        return "–"
    from pilamim import tracking

    url = tracking.run_url(SimpleNamespace(run_id=run_id, experiment_id=experiment_id))
    return f"[`{run_id[:8]}`]({url})" if url else f"`{run_id}`"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "–" if value is None else str(value)


def summarize(outcomes: dict[str, dict[str, Any]], pipeline: Any,
              status: str = "completed", error: str | None = None) -> dict[str, Any]:
    """The flow's return value: stages ran/skipped, headline metrics, promotion, MLflow ids."""
    metrics = {f"{stage}_{key}".replace("probe_knn", "knn"): outcomes[stage]["metrics"].get(key)
               for stage, key, _ in SUMMARY_METRICS if stage in outcomes}
    register = outcomes.get(FINAL, {}).get("metrics", {})
    return {
        "status": status,
        "error": error,
        "flow_run_id": str(flow_run.get_id() or ""),
        "pipeline_run_id": pipeline.run_id,
        "pipeline_id": pipeline.pipeline_id,
        "experiment_id": pipeline.experiment_id,
        "ran": [s for s in STAGES if s in outcomes and not outcomes[s]["skipped"]],
        "skipped": [s for s in STAGES if s in outcomes and outcomes[s]["skipped"]],
        "stages": " ".join(f"{s}={'skipped' if o['skipped'] else 'ran'}"
                           for s, o in outcomes.items()),
        "mlflow_runs": {s: o["mlflow_run_id"] for s, o in outcomes.items() if o["mlflow_run_id"]},
        "metrics": {k: v for k, v in metrics.items() if v is not None},
        "model_name": register.get("model_name"),
        "model_version": register.get("version"),
        "decision": register.get("action"),
        "decision_reason": register.get("reason"),
        "artifact_key": ARTIFACT_KEY,
    }


def summary_markdown(summary: dict[str, Any], outcomes: dict[str, dict[str, Any]]) -> str:
    """The markdown artifact: what ran, what it measured, what the gate decided, where to look."""
    from pilamim import tracking

    exp = summary["experiment_id"]
    lines = [f"# PiLaMIM pipeline: {summary['status']}", ""]
    if summary["error"]:
        lines += [f"**Error:** {summary['error']}", ""]
    uri = tracking.resolve_tracking_uri()
    lines += [f"MLflow pipeline run: {_link(summary['pipeline_run_id'], exp)} "
              f"(experiment `{exp}`, tracking `{uri}`)."]
    if not uri.startswith(("http://", "https://")):
        lines += ["", f"Open it with `mlflow ui --backend-store-uri {uri}`."]
    lines += ["", "## Stages", "", "| stage | status | MLflow run | seconds |",
              "|---|---|---|---|"]
    for stage in STAGES:
        o = outcomes.get(stage)
        if o is None:
            lines.append(f"| {stage} | not run | – | – |")
            continue
        status = "skipped (up to date in dvc.lock)" if o["skipped"] else "ran"
        seconds = "–" if o["skipped"] else f"{o['seconds']:.1f}"
        lines.append(f"| {stage} | {status} | {_link(o['mlflow_run_id'], exp)} | {seconds} |")
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    for stage, key, label in SUMMARY_METRICS:
        value = outcomes.get(stage, {}).get("metrics", {}).get(key)
        lines.append(f"| {label} | {_fmt(value)} |")
    lines += ["", "## Promotion", ""]
    if summary["decision"]:
        register = outcomes[FINAL]
        when = " (earlier run; register was up to date)" if register["skipped"] else ""
        lines.append(f"`{summary['model_name']}` version {summary['model_version']} -> "
                     f"**@{summary['decision']}**{when}: {summary['decision_reason']}")
    else:
        lines.append("No registration recorded.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the flow


@flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=len(CONCURRENT)),
      persist_result=True)
def pilamim_pipeline(params: Params | None = None, params_dir: str = "params",
                     force: bool = False) -> dict[str, Any]:
    """fetch -> prepare -> pretrain -> probe + finetune (concurrent) -> register.

    Args:
        params: every params group; None reads ``params_dir``. Given params are written to
            ``params_dir`` first when they differ (DVC reads the files).
        params_dir: folder of ``<group>.yaml`` files (relative to the working directory, the
            repository root).
        force: run every stage even when DVC reports it up to date.
    """
    from pilamim import tracking

    params = sync_params(params, params_dir)
    logger = get_run_logger()
    outcomes: dict[str, dict[str, Any]] = {}
    with tracking.pipeline_run(params) as pipeline:
        logger.info("MLflow pipeline run %s (experiment %s)", pipeline.run_id,
                    pipeline.experiment_id)
        try:
            for stage in SEQUENTIAL:
                outcomes[stage] = STAGE_TASKS[stage](stage, params, force)
            threads = _threads_per_process(len(CONCURRENT))
            futures = {s: STAGE_TASKS[s].submit(s, params, force, isolate=True, threads=threads)
                       for s in CONCURRENT}
            wait(list(futures.values()))
            for stage, future in futures.items():  # raises the first failure, after both end
                outcomes[stage] = future.result()
            outcomes[FINAL] = STAGE_TASKS[FINAL](FINAL, params, force)
        except Exception as err:
            summary = summarize(outcomes, pipeline, "failed", f"{type(err).__name__}: {err}")
            try:
                _publish(summary, outcomes)
            except Exception as publish_err:  # noqa: BLE001 - the stage's error matters more
                logger.warning("could not publish the run summary: %s", publish_err)
            raise
        summary = summarize(outcomes, pipeline)
        pipeline.set_tags({"pilamim.stages_ran": ",".join(summary["ran"]) or "none"})
        _publish(summary, outcomes)
    return summary


def _publish(summary: dict[str, Any], outcomes: dict[str, dict[str, Any]]) -> None:
    create_markdown_artifact(markdown=summary_markdown(summary, outcomes), key=ARTIFACT_KEY,
                             description="PiLaMIM pipeline: stages, metrics, promotion decision")
