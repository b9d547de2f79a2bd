"""The Prefect flow ``pilamim-pipeline``: every stage as a task, skipping what DVC says is done.

    fetch -> prepare -> pretrain -> (probe | finetune, concurrently on enough cores) -> register

Stages are written once (``pilamim/stages/``) and described once, in the stage table
(:mod:`pilamim.stages`): the order above is its :func:`~pilamim.stages.waves` (stages whose inputs
are all made run; a wave of several may run side by side). A task here only decides *whether* a
stage runs and records the outcome:

* **Skip what is up to date.** Before a stage runs, the task asks DVC
  (:func:`pilamim_flows.dvc_state.stage_up_to_date`: the stage's deps, params and outs match
  ``dvc.lock``). If so, the task returns the stage's existing metrics marked ``skipped``. After
  a stage ran, :func:`pilamim_flows.dvc_state.commit_stage` records it in ``dvc.lock``, so
  ``dvc repro`` then finds nothing to do either — the flow and ``dvc repro`` are two entrances to
  one cache. ``force=True`` runs every stage. Outside a DVC repo every stage runs.
* **Params live in files.** DVC reads ``params/*.yaml``, so the flow does too: with
  ``params=None`` they are loaded from ``params_dir``; a ``Params`` given to the flow (from the
  Prefect UI, a deployment or ``pilamim run --set``) that differs from the files is written
  there first (:func:`pilamim.params_files.dump_params`, which rewrites the files without their
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
* **Retries only for transient failures** (:mod:`pilamim_flows.retry`): unreachable tracking server,
  connection errors and timeouts, S3 endpoint errors, SQLite "database is locked", DVC's lock.
  Bad params, missing inputs and other bugs fail at once.
* **A wave of several stages (probe and finetune) runs concurrently** when the machine has the
  cores to give each a useful thread pool (:func:`pilamim_flows.isolation.stage_slots`: 4 threads
  each), else one after the other with every core each (on 2 cores that is faster, and the
  fine-tune does not straggle on one thread after the short probe has finished). Each runs in its
  own Python process (:mod:`pilamim_flows.isolation`). In one process the two trainings would
  share torch's, numpy's and Python's global RNGs (dropout, drop path, Mixup, RandAugment draw
  from them), so their results would depend on thread timing and differ from a sequential
  ``dvc repro``. DVC bookkeeping stays in this process, where :mod:`pilamim_flows.dvc_state`
  serialises it, so the two never meet DVC's lock.
* **MLflow.** The flow runs inside :func:`pilamim.tracking.runs.pipeline_run` (the parent run);
  every stage run is its child (env ``PILAMIM_PARENT_RUN_ID``, inherited by the stage processes) and
  is tagged with the Prefect flow-run and task-run ids, which the flow passes down
  (:func:`_prefect_tags`): tracking itself does not import Prefect.
* **One run per checkout** (:mod:`pilamim.checkout_lock`). The flow holds the working directory
  from before it touches ``params/`` to its end; its stage calls and stage processes belong to
  it and pass, while another ``pilamim run``, stage command or ``dvc repro`` there is refused.
* **Summary.** A markdown artifact ``pilamim-pipeline-summary`` (Artifacts page of the Prefect
  UI): metrics table, promotion decision and reason, MLflow runs, which stages ran or were
  skipped. The flow returns the same facts as a dict (:mod:`pilamim_flows.summary`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pilamim_flows import dvc_state
from pilamim_flows.isolation import execute_isolated, stage_slots
from pilamim_flows.retry import retry_transient
from pilamim_flows.summary import ARTIFACT_KEY, publish, summarize
from prefect import flow, get_run_logger, task
from prefect.futures import wait
from prefect.runtime import flow_run, task_run
from prefect.task_runners import ThreadPoolTaskRunner

from pilamim.checkout_lock import hold_checkout
from pilamim.config import Params, ParamsError
from pilamim.params_files import dump_params, load_params
from pilamim.stages import STAGES, stage, waves

FLOW_NAME = "pilamim-pipeline"
RETRIES = 2
RETRY_DELAYS_S = [10, 60]

__all__ = ["ARTIFACT_KEY", "FLOW_NAME", "STAGE_TASKS", "pilamim_pipeline", "run_stage"]


# ----------------------------------------------------------------------------- stage execution


def read_metrics(name: str, params: Params) -> dict[str, Any]:
    """The scalars of a stage's metrics JSON (``{}`` when it has none or it is missing)."""
    path = stage(name).metrics_file(params)
    if path is None or not Path(path).exists():
        return {}
    try:
        return _scalars(json.loads(Path(path).read_text()))
    except (OSError, ValueError):
        return {}


def _scalars(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if v is None or isinstance(v, str | int | float | bool)}


def _prefect_tags() -> dict[str, str]:
    """This flow/task run's Prefect ids as MLflow tags (only the ids that exist here).

    Tracking never imports Prefect (:mod:`pilamim.tracking`), so the flow, which runs inside
    Prefect, hands these to the runs it opens: the pipeline run, the stage runs of this process.
    """
    from pilamim.tracking import runs

    ids = {runs.TAG_PREFECT_FLOW_RUN: flow_run.get_id(),
           runs.TAG_PREFECT_TASK_RUN: task_run.get_id()}
    return {key: str(value) for key, value in ids.items() if value}


def _tag_prefect_ids(run_id: str | None) -> None:
    """Tag a stage run made in a child process with this flow/task run's Prefect ids.

    The child has no Prefect run context to pass down, so its run is tagged once it returns.
    """
    if not run_id:
        return
    from pilamim.tracking import server

    try:
        client, _ = server.connect(check=False)
        for key, value in _prefect_tags().items():
            client.set_tag(run_id, key, value)
    except Exception as err:  # noqa: BLE001 - lineage tags are best effort
        get_run_logger().warning("could not tag MLflow run %s with Prefect ids: %s", run_id, err)


def stage_cache_key(context: Any, inputs: dict[str, Any]) -> str:
    """Prefect cache/result key: stage + its params' content + this flow run (+ force).

    Content, not objects: the validated values of the params groups the stage reads (the same
    groups DVC lists as its ``params``), hashed as canonical JSON.
    """
    name, params = inputs["stage"], inputs["params"]
    values = {g: getattr(params, g).model_dump(mode="json") for g in stage(name).groups}
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
    run = context.task_run.flow_run_id or context.task_run.id
    force = "-force" if inputs.get("force") else ""
    return f"pilamim-{name}-{digest}-{run}{force}"


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

        result = execute(stage, params, extra_tags=_prefect_tags())
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


# ----------------------------------------------------------------------------- the flow


@flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=max(map(len, waves()))),
      persist_result=True)
def pilamim_pipeline(params: Params | None = None, params_dir: str = "params",
                     force: bool = False) -> dict[str, Any]:
    """Every stage in the stage table's order (:func:`pilamim.stages.waves`): fetch -> prepare
    -> pretrain -> probe + finetune (concurrent on enough cores) -> register.

    Args:
        params: every params group; None reads ``params_dir``. Given params are written to
            ``params_dir`` first when they differ (DVC reads the files).
        params_dir: folder of ``<group>.yaml`` files (relative to the working directory, the
            repository root).
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
            for wave in waves():
                outcomes.update(_run_wave(wave, params, force))
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


def _run_wave(wave: tuple[str, ...], params: Params, force: bool) -> dict[str, dict[str, Any]]:
    """One stage in this process; several side by side, each in its own process, as many at
    once as :func:`stage_slots` gives a useful thread pool (else in turn with all cores)."""
    if len(wave) == 1:
        return {wave[0]: STAGE_TASKS[wave[0]](wave[0], params, force)}
    outcomes = {}
    at_once, threads = stage_slots(len(wave))
    for start in range(0, len(wave), at_once):
        futures = {s: STAGE_TASKS[s].submit(s, params, force, isolate=True, threads=threads)
                   for s in wave[start:start + at_once]}
        wait(list(futures.values()))
        for name, future in futures.items():  # the first failure, after all have ended
            outcomes[name] = future.result()
    return outcomes

