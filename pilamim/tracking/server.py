"""Where MLflow runs go, and failing fast when the tracking server is not there.

``MLFLOW_TRACKING_URI`` wins. Without it, runs go to a SQLite store ``./mlflow.db`` (made
absolute) with artifacts in ``./mlartifacts``: run ``mlflow ui`` in the same folder and it opens
that very database (MLflow 3's ``mlflow ui``/``mlflow server`` default backend is
``sqlite:///mlflow.db``; artifacts of our runs are read from the recorded absolute ``file://``
location, so the UI shows them too).

MLflow's HTTP client retries for minutes when a server is down. Before a stage does any work we
probe ``<uri>/health`` (:func:`check_tracking_reachable`) and fail within seconds with
:class:`TrackingUnavailable`; while a run is open :func:`http_limits` caps MLflow's retries and
timeouts (unless the user set them) so a server dying mid-run cannot hang a stage for long.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

DEFAULT_EXPERIMENT = "pilamim"
DEFAULT_DB_NAME = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"

# Env var naming the experiment (read at call time, so tests and the Prefect flow can set it).
ENV_EXPERIMENT = "PILAMIM_EXPERIMENT"

# Caps applied to MLflow's HTTP client while a run is open, unless the user set them.
# Defaults in MLflow 3.17 are 7 retries with backoff factor 2 (minutes of waiting) and 120 s.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached; the message says what to check."""


def default_tracking_uri(root: str | Path | None = None) -> str:
    """``sqlite:///<abs root>/mlflow.db`` — the file ``mlflow ui`` opens when run in ``root``."""
    base = Path(root) if root is not None else Path.cwd()
    return f"sqlite:///{(base / DEFAULT_DB_NAME).resolve()}"


def resolve_tracking_uri(root: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else :func:`default_tracking_uri` (current folder)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; ``None`` for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: ``mlartifacts/`` beside a SQLite file.

    For servers (http), the server decides (``--artifacts-destination``); for other databases
    MLflow's own default applies. Returns ``None`` when MLflow should decide.
    """
    db = sqlite_path(tracking_uri)
    if db is not None:
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
            f"{brief_error(err)}). {hint}"
        ) from None
    if response.status_code >= 500:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} answered {response.status_code} on /health. {hint}"
        )


def brief_error(err: BaseException, limit: int = 200) -> str:
    """An exception's message cut to ``limit`` characters: an HTTP error from the tracking
    server can carry a whole HTML page, which would bury the hint next to it."""
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
    name = experiment or os.environ.get(ENV_EXPERIMENT) or DEFAULT_EXPERIMENT
    with _sqlite_setup_lock(uri):  # the client's store creates (migrates) a missing database
        client = MlflowClient(tracking_uri=uri)
        return client, _ensure_experiment(client, name, uri)


@contextlib.contextmanager
def _sqlite_setup_lock(uri: str) -> Iterator[None]:
    """Serialise opening a SQLite store across processes.

    MLflow creates a missing SQLite store by running its alembic migrations on first use; two
    processes doing that at once (two stages started together on a fresh folder) both fail
    with "duplicate column" or alembic version errors. Once the store exists the lock costs
    one uncontended file lock per stage.
    """
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock"):
        yield


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
