"""MLflow glue for the stages: where runs go, what every run records, and fast failure.

Only this module and :mod:`pilamim.registry` import MLflow; the library reports through the
:class:`pilamim.callbacks.Logger` protocol and a stage plugs :class:`MLflowLogger` into it.

Where runs go. ``MLFLOW_TRACKING_URI`` wins. Without it, runs go to a SQLite store
``./mlflow.db`` (made absolute) with artifacts in ``./mlartifacts``: run ``mlflow ui`` in the
same folder and it opens that very database (MLflow 3's ``mlflow ui``/``mlflow server`` default
backend is ``sqlite:///mlflow.db``; artifacts of our runs are read from the recorded absolute
``file://`` location, so the UI shows them too).

What every stage run records (:func:`stage_run`): the stage name as the run name, the validated
params of the groups the stage reads (keys ``<group>.<key>``, so the UI filter is
``params.pretrain.epochs``), the effective params as ``params/effective.yaml``, tags for the git
commit (+ dirty flag), the params hash, the pipeline id linking the stage runs of one pipeline
execution, the Prefect flow-run id when run by Prefect and the DVC/prepared data digest, and
system metrics (CPU, memory, GPU) sampled by MLflow in the background.

Fast failure. MLflow's HTTP client retries for minutes when a server is down. Before a stage
does any work we probe ``<uri>/health`` (:func:`check_tracking_reachable`) and fail within
seconds with :class:`TrackingUnavailable`; while a run is open we cap MLflow's retries and
timeouts (unless the user set them) so a server dying mid-run cannot hang a stage for long.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pilamim.config import GROUPS, Params
from pilamim.stages import STAGE_GROUPS as _STAGE_GROUPS

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "pilamim"
DEFAULT_DB_NAME = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"

# Env vars (read at call time, so tests and the Prefect flow can set them).
ENV_EXPERIMENT = "PILAMIM_EXPERIMENT"
ENV_PIPELINE_ID = "PILAMIM_PIPELINE_ID"
ENV_PARENT_RUN_ID = "PILAMIM_PARENT_RUN_ID"

# Tag keys written on every stage run (and, for lineage, on model versions).
TAG_STAGE = "pilamim.stage"
TAG_PIPELINE_ID = "pilamim.pipeline_id"
TAG_PARAMS_HASH = "pilamim.params_hash"
TAG_GIT_COMMIT = "pilamim.git_commit"
TAG_GIT_DIRTY = "pilamim.git_dirty"
TAG_DATA_DIGEST = "pilamim.data_digest"
TAG_PREFECT_FLOW_RUN = "pilamim.prefect_flow_run_id"
TAG_PREFECT_TASK_RUN = "pilamim.prefect_task_run_id"

# Which params groups each stage reads; a stage run logs exactly these.
STAGE_GROUPS: dict[str, tuple[str, ...]] = {**_STAGE_GROUPS, "pipeline": tuple(GROUPS)}

# Caps applied to MLflow's HTTP client while a run is open, unless the user set them.
# Defaults in MLflow 3.17 are 7 retries with backoff factor 2 (minutes of waiting) and 120 s.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached; the message says what to check."""


# ----------------------------------------------------------------------------- where runs go


def default_tracking_uri(root: str | Path | None = None) -> str:
    """``sqlite:///<abs root>/mlflow.db`` — the file ``mlflow ui`` opens when run in ``root``."""
    base = Path(root) if root is not None else Path.cwd()
    return f"sqlite:///{(base / DEFAULT_DB_NAME).resolve()}"


def resolve_tracking_uri(root: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else :func:`default_tracking_uri` (current folder)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: ``mlartifacts/`` beside a SQLite file.

    For servers (http), the server decides (``--artifacts-destination``); for other databases
    MLflow's own default applies. Returns ``None`` when MLflow should decide.
    """
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
        return (db.parent / DEFAULT_ARTIFACT_DIR / safe).resolve().as_uri()
    return None


def check_tracking_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail within ``timeout_s`` when an http(s) tracking server does not answer.

    Local stores (sqlite, file, postgres...) are not probed here: they fail fast on their own.
    Any HTTP answer below 500 counts as reachable (an auth proxy may answer 401 to /health).
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    url = uri.rstrip("/") + "/health"
    hint = (f"Is `mlflow server` running there and reachable from this machine? Check "
            f"MLFLOW_TRACKING_URI (now {uri!r}); unset it to use the local SQLite store "
            f"./{DEFAULT_DB_NAME}.")
    try:
        response = requests.get(url, timeout=timeout_s)
    except requests.RequestException as err:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is unreachable ({type(err).__name__}: "
            f"{_short(err)}). {hint}"
        ) from None
    if response.status_code >= 500:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} answered {response.status_code} on /health. {hint}"
        )


def _short(err: BaseException, limit: int = 200) -> str:
    text = str(err)
    return text if len(text) <= limit else text[:limit] + "..."


_limits_lock = threading.Lock()
_limits_depth = 0
_limits_set: list[str] = []


@contextlib.contextmanager
def http_limits() -> Iterator[None]:
    """Cap MLflow's HTTP retries/timeouts while inside (re-entrant, thread-safe).

    Only variables the user has not set are touched, and they are removed again when the last
    concurrent user leaves (the Prefect flow runs probe and finetune in threads).
    """
    global _limits_depth
    with _limits_lock:
        if _limits_depth == 0:
            for key, value in HTTP_LIMITS.items():
                if key not in os.environ:
                    os.environ[key] = value
                    _limits_set.append(key)
        _limits_depth += 1
    try:
        yield
    finally:
        with _limits_lock:
            _limits_depth -= 1
            if _limits_depth == 0:
                for key in _limits_set:
                    os.environ.pop(key, None)
                _limits_set.clear()


def connect(experiment: str | None = None, *, check: bool = True) -> tuple[MlflowClient, str]:
    """Point MLflow at the resolved URI, make sure the experiment exists; return client, id.

    ``check`` probes an http server first, so an unreachable one fails in seconds and before
    anything is written locally.
    """
    uri = resolve_tracking_uri()
    if check:
        check_tracking_reachable(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    name = experiment or os.environ.get(ENV_EXPERIMENT) or DEFAULT_EXPERIMENT
    return client, _ensure_experiment(client, name, uri)


def _ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, name))
    except MlflowException:
        # Another stage process created it between our lookup and create.
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


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
    """Prefect flow-run (and task-run) id when running under Prefect; {} otherwise.

    Prefect is only consulted when already imported (a Prefect flow imported it); importing it
    here would cost seconds for every CLI/DVC stage. Deployment workers also export
    ``PREFECT__FLOW_RUN_ID``.
    """
    ids = {}
    if env_id := os.environ.get("PREFECT__FLOW_RUN_ID"):
        ids[TAG_PREFECT_FLOW_RUN] = env_id
    if "prefect" in sys.modules:
        try:
            from prefect.runtime import flow_run, task_run

            if fid := flow_run.get_id():
                ids[TAG_PREFECT_FLOW_RUN] = str(fid)
            if tid := task_run.get_id():
                ids[TAG_PREFECT_TASK_RUN] = str(tid)
        except Exception as err:  # noqa: BLE001 - lineage is best effort, never fatal
            log.debug("no Prefect run context: %s", err)
    return ids


def read_data_digest(prepared_dir: str | Path) -> str | None:
    """``digest`` from ``<prepared_dir>/dataset.json``, None when the file is absent."""
    path = Path(prepared_dir) / "dataset.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("digest")


# ----------------------------------------------------------------------------- metric logging


class MLflowLogger:
    """:class:`pilamim.callbacks.Logger` that batches metrics into few ``log_batch`` calls.

    Metrics are buffered and sent when ``flush_every_s`` has passed since the last send or the
    buffer holds ``max_buffer`` values (MLflow takes at most 1000 per batch), and on
    :meth:`flush`/:meth:`close`. So a training loop may call :meth:`log_metrics` every step
    without waiting on the tracking store. If the store fails mid-run the logger warns once
    and drops further metrics: training output matters more than its curves.
    """

    def __init__(self, run_id: str, client: MlflowClient | None = None, *,
                 flush_every_s: float = 5.0, max_buffer: int = 1000,
                 artifact_dirs: Mapping[str, str] | None = None) -> None:
        self.run_id = run_id
        self.client = client or MlflowClient()
        self.flush_every_s = flush_every_s
        self.max_buffer = min(max_buffer, 1000)
        # File suffix -> artifact sub folder, so figures and JSON land in tidy places.
        self.artifact_dirs = dict(artifact_dirs or {".png": "figures", ".jpg": "figures",
                                                     ".json": "metrics", ".csv": "curves"})
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._broken = False

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now_ms = int(time.time() * 1000)
        with self._lock:
            if self._broken:
                return
            for key, value in metrics.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                self._buffer.append(Metric(key=key, value=number, timestamp=now_ms,
                                           step=int(step)))
            due = time.monotonic() - self._last_flush >= self.flush_every_s
            if due or len(self._buffer) >= self.max_buffer:
                self._flush_locked()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if artifact_path is None:
            artifact_path = self.artifact_dirs.get(path.suffix.lower())
        try:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as err:  # noqa: BLE001 - see class docstring
            self._warn(f"could not log artifact {path}: {_short(err)}")

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def close(self) -> None:
        self.flush()

    def _flush_locked(self) -> None:
        self._last_flush = time.monotonic()
        while self._buffer and not self._broken:
            chunk, self._buffer = self._buffer[:self.max_buffer], self._buffer[self.max_buffer:]
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as err:  # noqa: BLE001 - see class docstring
                self._broken = True
                self._buffer.clear()
                self._warn(f"MLflow metric logging failed, further metrics of run {self.run_id} "
                           f"are not sent (the stage's CSV/JSON outputs still are): "
                           f"{_short(err)}")

    def _warn(self, message: str) -> None:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        log.warning(message)


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


@contextlib.contextmanager
def stage_run(stage_name: str, params: Params, *, groups: Iterable[str] | None = None,
              parent_run_id: str | None = None, pipeline_tag: str | None = None,
              dataset_digest: str | None = None, extra_tags: Mapping[str, Any] | None = None,
              log_system_metrics: bool = True) -> Iterator[StageRun]:
    """Open the MLflow run of one stage; yields a :class:`StageRun`.

    ``groups`` defaults to :data:`STAGE_GROUPS` for the stage. ``parent_run_id`` defaults to
    env ``PILAMIM_PARENT_RUN_ID`` and ``pipeline_tag`` to env ``PILAMIM_PIPELINE_ID`` (a new
    id when neither is set). An inherited ``MLFLOW_RUN_ID`` is ignored (MLflow would silently
    resume that run instead of creating ours). The run ends FINISHED, or FAILED when the body
    raises; buffered metrics are flushed either way.
    """
    used = tuple(groups) if groups is not None else STAGE_GROUPS.get(stage_name, tuple(GROUPS))
    parent_run_id = parent_run_id or os.environ.get(ENV_PARENT_RUN_ID) or None
    pipeline_id = pipeline_tag or os.environ.get(ENV_PIPELINE_ID) or uuid.uuid4().hex
    commit, dirty = git_info()
    tags = {
        TAG_STAGE: stage_name,
        TAG_PIPELINE_ID: pipeline_id,
        TAG_PARAMS_HASH: params_hash(params, used),
        TAG_GIT_COMMIT: commit,
        TAG_GIT_DIRTY: str(dirty).lower(),
        **prefect_ids(),
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
            log.warning("could not mark MLflow run %s failed: %s", run_id, _short(err))
            return
        raise TrackingUnavailable(
            f"could not close MLflow run {run_id} at {resolve_tracking_uri()} "
            f"({type(err).__name__}: {_short(err)}); the stage's output files are saved. "
            f"Check the tracking server / MLFLOW_TRACKING_URI and rerun the stage to record it."
        ) from err


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
    pipeline_id = pipeline_id or os.environ.get(ENV_PIPELINE_ID) or uuid.uuid4().hex
    commit, dirty = git_info()
    tags = {TAG_STAGE: "pipeline", TAG_PIPELINE_ID: pipeline_id,
            TAG_PARAMS_HASH: params_hash(params), TAG_GIT_COMMIT: commit,
            TAG_GIT_DIRTY: str(dirty).lower(), **prefect_ids(),
            **{k: str(v) for k, v in (extra_tags or {}).items()}}
    with http_limits():
        client, experiment_id = connect()
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


# ----------------------------------------------------------------------------- dataset input


# MLflow stores a dataset digest in 36 characters at most; the full digest goes in a tag.
MAX_MLFLOW_DIGEST = 36


def log_dataset_input(prepared_dir: str | Path, name: str = "prepared",
                      context: str = "training") -> str:
    """Log ``<prepared_dir>/manifest.csv`` as the active run's dataset input; returns the digest.

    The dataset is the manifest (path, label, split, sha256 per image); its digest is
    ``dataset.json``'s ``digest`` (so every run of one data version shows the same one; MLflow
    keeps 36 characters, the full digest is in the input tag ``pilamim.full_digest`` and the
    run tag ``pilamim.data_digest``) and its source is the image root from ``dataset.json``.
    """
    import pandas as pd

    prepared = Path(prepared_dir)
    manifest, meta_path = prepared / "manifest.csv", prepared / "dataset.json"
    if not manifest.exists() or not meta_path.exists():
        raise FileNotFoundError(
            f"{prepared} has no manifest.csv/dataset.json — run `pilamim prepare` first"
        )
    meta = json.loads(meta_path.read_text())
    digest = str(meta["digest"])
    frame = pd.read_csv(manifest)
    root = meta.get("root") or str(prepared)
    source = root if "://" in str(root) else str(Path(root).resolve())
    with warnings.catch_warnings():
        # MLflow 3.17 registers its local-file source class twice and warns it is ambiguous.
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, targets="label",
                                          digest=digest[:MAX_MLFLOW_DIGEST])
    mlflow.log_input(dataset, context=context, tags={"pilamim.full_digest": digest})
    mlflow.set_tag(TAG_DATA_DIGEST, digest)
    return digest
