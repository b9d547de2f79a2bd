"""MLflow runs of the stages and the pipeline: what every run records and how it links up.

MLflow is imported only under :mod:`pilamim.tracking` (this module; :mod:`.server`: where runs
go, fast failure; :mod:`.logger`; :mod:`.datasets`; :mod:`.owners`) and :mod:`pilamim.registry`;
the library reports through the :class:`pilamim.loggers.Logger` protocol and a stage plugs
:class:`pilamim.tracking.logger.MLflowLogger` into it.

What every stage run records (:func:`stage_run`): the stage name as the run name, the validated
params of the groups the stage reads (keys ``<group>.<key>``, so the UI filter is
``params.pretrain.epochs``), the effective params as ``params/effective.yaml``, tags for the git
commit (+ dirty flag), the params hash, the pipeline id linking the stage runs of one pipeline
execution, the DVC/prepared data digest, and system metrics (CPU, memory, GPU) sampled by MLflow
in the background.

Prefect is orchestration, not tracking: this module never imports it (``tests/test_layers.py``
checks that no :mod:`pilamim` module does). A run started by the Prefect flow gets its flow-run
and task-run ids because the flow, which has them, hands them down: as ``extra_tags`` to the
pipeline run it opens itself (:func:`pipeline_run`), and to the stage commands it starts (DVC
runs them) through the environment variable ``PILAMIM_RUN_TAGS`` (:func:`env_tags`), as it hands
them the parent run id (``PILAMIM_PARENT_RUN_ID``). ``PREFECT__FLOW_RUN_ID``, which Prefect's
workers export to the processes they start, is read too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pilamim.config import GROUPS, Params
from pilamim.tracking.logger import MLflowLogger
from pilamim.tracking.owners import TAG_OWNER, close_orphaned_runs, owner_tag
from pilamim.tracking.server import (
    TrackingUnavailable,
    brief_error,
    connect,
    http_limits,
    resolve_tracking_uri,
)

log = logging.getLogger(__name__)

# MLflow's system-metrics monitor logs four INFO lines around every run ("Skip logging GPU
# metrics", "Started monitoring", ...): 24 lines of noise per `pilamim run`; its SQLite store
# two more on first use. Their warnings stay.
QUIETED_LOGGERS = ("mlflow.system_metrics", "mlflow.store.db.utils")

# Env vars (read at call time, so tests and the Prefect flow can set them).
ENV_PIPELINE_ID = "PILAMIM_PIPELINE_ID"
ENV_PARENT_RUN_ID = "PILAMIM_PARENT_RUN_ID"
ENV_RUN_TAGS = "PILAMIM_RUN_TAGS"  # a JSON object of extra tags for stage runs

# Tag keys written on every stage run (and, for lineage, on model versions).
TAG_STAGE = "pilamim.stage"
TAG_PIPELINE_ID = "pilamim.pipeline_id"
TAG_PARAMS_HASH = "pilamim.params_hash"
TAG_GIT_COMMIT = "pilamim.git_commit"
TAG_GIT_DIRTY = "pilamim.git_dirty"
TAG_DATA_DIGEST = "pilamim.data_digest"
TAG_PREFECT_FLOW_RUN = "pilamim.prefect_flow_run_id"
TAG_PREFECT_TASK_RUN = "pilamim.prefect_task_run_id"

# ----------------------------------------------------------------------------- lineage facts


@lru_cache(maxsize=8)
def git_info(cwd: str | None = None) -> tuple[str, bool]:
    """``(commit, dirty)`` of the git checkout at ``cwd``; ``("unknown", False)`` outside one."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=cwd, capture_output=True, text=True, timeout=10,
                                check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return commit or "unknown", bool(status.strip())


def params_dict(params: Params, groups: Iterable[str] | None = None) -> dict[str, dict]:
    """The validated values of ``groups`` (all when None) as plain JSON types."""
    names = list(groups) if groups is not None else list(GROUPS)
    return {g: getattr(params, g).model_dump(mode="json") for g in names}


def params_hash(params: Params, groups: Iterable[str] | None = None) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of the validated groups."""
    canonical = json.dumps(params_dict(params, groups), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def flatten_params(values: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``{group: {key: v}}`` -> ``{"group.key": str}``; non-strings as JSON (null, [0.9, 0.95])."""
    flat = {}
    for group, items in values.items():
        for key, value in items.items():
            flat[f"{group}.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat


def prefect_ids() -> dict[str, str]:
    """The Prefect flow-run id a worker exported (``PREFECT__FLOW_RUN_ID``) as a tag; {} otherwise.

    Only the environment is read: importing Prefect here would cost every CLI/DVC stage seconds
    and tie tracking to one orchestrator. The flow passes the ids of its run context itself
    (module docstring); :func:`env_tags` and ``extra_tags`` are applied after these, so its
    ids win.
    """
    env_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    return {TAG_PREFECT_FLOW_RUN: env_id} if env_id else {}


def env_tags() -> dict[str, str]:
    """The tags env ``PILAMIM_RUN_TAGS`` (a JSON object) asks for on a stage run; {} when unset.

    How an orchestrator that starts the stage command in another process (the Prefect flow, via
    ``dvc repro``) labels its run, the way ``PILAMIM_PARENT_RUN_ID`` links it. Lineage tags are
    best effort: a value that is not a JSON object is logged and ignored, not fatal to a stage.
    """
    raw = os.environ.get(ENV_RUN_TAGS)
    if not raw:
        return {}
    try:
        tags = json.loads(raw)
    except ValueError:
        tags = None
    if not isinstance(tags, dict):
        log.warning("ignoring %s: not a JSON object of tags: %.200s", ENV_RUN_TAGS, raw)
        return {}
    return {str(key): str(value) for key, value in tags.items()}


# ----------------------------------------------------------------------------- stage runs


@dataclass
class StageRun:
    """What :func:`stage_run` yields: the run's ids and a logger for the library."""

    run_id: str
    experiment_id: str
    stage: str
    pipeline_id: str
    client: MlflowClient
    logger: MLflowLogger
    tags: dict[str, str] = field(default_factory=dict)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Final/summary metrics (sent at once, not buffered)."""
        now_ms = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            with contextlib.suppress(TypeError, ValueError):
                items.append(Metric(key, float(value), now_ms, step or 0))
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.logger.log_artifact(Path(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))


@contextlib.contextmanager
def _without_env(name: str) -> Iterator[None]:
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def quiet_mlflow_chatter() -> None:
    """Raise :data:`QUIETED_LOGGERS` to WARNING, and turn off MLflow's artifact download bars
    (one per logged model) unless the user set ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``."""
    for name in QUIETED_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@contextlib.contextmanager
def stage_run(stage_name: str, params: Params, *, groups: Iterable[str] | None = None,
              parent_run_id: str | None = None, pipeline_tag: str | None = None,
              dataset_digest: str | None = None, extra_tags: Mapping[str, Any] | None = None,
              log_system_metrics: bool = True) -> Iterator[StageRun]:
    """Open the MLflow run of one stage; yields a :class:`StageRun`.

    ``groups`` are the params groups to log (the stage table's; every group when None).
    ``parent_run_id`` defaults to env ``PILAMIM_PARENT_RUN_ID`` and ``pipeline_tag`` to env
    ``PILAMIM_PIPELINE_ID``; when neither is set (stages run one by one, e.g. by ``dvc
    repro``) it is a lineage id from the git commit and the hash of all params, so the stages of
    one configuration share it. An inherited ``MLFLOW_RUN_ID`` is ignored (MLflow would silently
    resume that run instead of creating ours). The run ends FINISHED, or FAILED when the body
    raises; buffered metrics are flushed either way.
    """
    quiet_mlflow_chatter()
    used = tuple(groups) if groups is not None else tuple(GROUPS)
    parent_run_id = parent_run_id or os.environ.get(ENV_PARENT_RUN_ID) or None
    commit, dirty = git_info()
    pipeline_id = (pipeline_tag or os.environ.get(ENV_PIPELINE_ID)
                   or f"lineage-{commit[:12]}-{params_hash(params)[:12]}")
    tags = {
        TAG_STAGE: stage_name,
        TAG_PIPELINE_ID: pipeline_id,
        TAG_PARAMS_HASH: params_hash(params, used),
        TAG_GIT_COMMIT: commit,
        TAG_GIT_DIRTY: str(dirty).lower(),
        TAG_OWNER: owner_tag(),
        **prefect_ids(),
        **env_tags(),
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    if dataset_digest:
        tags[TAG_DATA_DIGEST] = dataset_digest
    tags.update({k: str(v) for k, v in (extra_tags or {}).items()})

    # MLflow resumes the run named by MLFLOW_RUN_ID instead of creating one, and end_run()
    # deletes the variable: keep it out for the run's lifetime, restore it afterwards.
    with http_limits(), _without_env("MLFLOW_RUN_ID"):
        client, experiment_id = connect()
        close_orphaned_runs(client, experiment_id)
        stack_top = mlflow.active_run()
        active = mlflow.start_run(
            experiment_id=experiment_id, run_name=stage_name,
            parent_run_id=parent_run_id, nested=stack_top is not None, tags=tags,
            log_system_metrics=log_system_metrics,
        )
        run_id = active.info.run_id
        logger = MLflowLogger(run_id, client)
        status = "FAILED"
        try:
            values = params_dict(params, used)
            mlflow.log_params(flatten_params(values))
            mlflow.log_text(yaml.safe_dump(values, sort_keys=False), "params/effective.yaml")
            yield StageRun(run_id=run_id, experiment_id=experiment_id, stage=stage_name,
                           pipeline_id=pipeline_id, client=client, logger=logger, tags=tags)
            status = "FINISHED"
        finally:
            try:
                logger.close()
            finally:
                _end_run(status, run_id)


def _end_run(status: str, run_id: str) -> None:
    """End the active run; a tracking store gone mid-run becomes one clear error.

    The stage's files are already written atomically by then, so the message says so.
    """
    try:
        mlflow.end_run(status=status)
    except Exception as err:
        if status == "FAILED":     # the body's own error is the one to show
            log.warning("could not mark MLflow run %s failed: %s", run_id, brief_error(err))
            return
        raise TrackingUnavailable(
            f"could not close MLflow run {run_id} at {resolve_tracking_uri()} "
            f"({type(err).__name__}: {brief_error(err)}); the stage's output files are saved. "
            f"Check the tracking server / MLFLOW_TRACKING_URI and rerun the stage to record it."
        ) from err


def active_run_ids() -> tuple[str, str] | None:
    """``(run id, pipeline id)`` of the MLflow run open in this process, if any: a step called
    inside a stage run (the runner opened it) logs there instead of opening its own."""
    active = mlflow.active_run()
    if active is None:
        return None
    return active.info.run_id, active.data.tags.get(TAG_PIPELINE_ID, "")


@contextlib.contextmanager
def pipeline_run(params: Params, *, pipeline_id: str | None = None,
                 run_name: str = "pipeline",
                 extra_tags: Mapping[str, Any] | None = None) -> Iterator[StageRun]:
    """The parent run of one pipeline execution (for the Prefect flow / ``pilamim run``).

    Created with the client, not pushed on MLflow's per-thread active-run stack, so stage runs
    in any thread or subprocess can name it as parent. Inside, env ``PILAMIM_PIPELINE_ID`` and
    ``PILAMIM_PARENT_RUN_ID`` are set, so every :func:`stage_run` (also in DVC-launched
    subprocesses) links to it without extra arguments.
    """
    quiet_mlflow_chatter()
    pipeline_id = pipeline_id or os.environ.get(ENV_PIPELINE_ID) or uuid.uuid4().hex
    commit, dirty = git_info()
    tags = {TAG_STAGE: "pipeline", TAG_PIPELINE_ID: pipeline_id,
            TAG_PARAMS_HASH: params_hash(params), TAG_GIT_COMMIT: commit,
            TAG_GIT_DIRTY: str(dirty).lower(), TAG_OWNER: owner_tag(), **prefect_ids(),
            **{k: str(v) for k, v in (extra_tags or {}).items()}}
    with http_limits():
        client, experiment_id = connect()
        close_orphaned_runs(client, experiment_id)
        run = client.create_run(experiment_id, tags=tags, run_name=run_name)
        run_id = run.info.run_id
        logger = MLflowLogger(run_id, client)
        saved = {k: os.environ.get(k) for k in (ENV_PIPELINE_ID, ENV_PARENT_RUN_ID)}
        os.environ[ENV_PIPELINE_ID] = pipeline_id
        os.environ[ENV_PARENT_RUN_ID] = run_id
        status = "FAILED"
        try:
            values = params_dict(params)
            client.log_batch(run_id, params=[
                Param(k, v) for k, v in flatten_params(values).items()])
            client.log_text(run_id, yaml.safe_dump(values, sort_keys=False),
                            "params/effective.yaml")
            yield StageRun(run_id=run_id, experiment_id=experiment_id, stage="pipeline",
                           pipeline_id=pipeline_id, client=client, logger=logger, tags=tags)
            status = "FINISHED"
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            try:
                logger.close()
            finally:
                client.set_terminated(run_id, status)


def run_url(run: StageRun) -> str | None:
    """Link to a run in the MLflow UI (for the Prefect summary); None for local stores."""
    uri = resolve_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
