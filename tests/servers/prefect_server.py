"""Start a real Prefect server, and process work pool workers, on loopback for tests.

``prefect server start`` runs with its own ``PREFECT_HOME`` (SQLite database inside it
unless a database URL is given) and analytics off. :func:`prefect_worker` runs
``prefect worker start --pool NAME --type process`` against the server, which creates the
``process`` work pool with its default job template when it does not exist yet (the same
as ``prefect work-pool create --type process NAME``, one CLI start less). A worker only
exits on a second SIGTERM (the first one lets it finish in-flight runs), so it is stopped
with two.

Usage::

    with prefect_server(tmp_path / "prefect") as server:
        with prefect_worker(server, "pilamim", tmp_path / "worker", env=extra_env):
            ...  # deploy, then run_deployment(...) against server.api_url
"""

from __future__ import annotations

import json
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.servers._process import (
    clean_env,
    free_port,
    http_ok,
    server_process,
)

START_TIMEOUT_S = 90.0
WORKER_TIMEOUT_S = 60.0
# Settings a server or worker must not inherit from the developer's shell or other tests.
_DROP = ("PREFECT_", "MLFLOW_", "AWS_")


@dataclass(frozen=True)
class PrefectServer:
    """A running Prefect API server."""

    api_url: str
    port: int
    pid: int
    home: Path
    log_path: Path

    def env(self) -> dict[str, str]:
        """Client settings that point at this server."""
        return {"PREFECT_API_URL": self.api_url}


@dataclass(frozen=True)
class PrefectWorker:
    """A running process-pool worker."""

    pool: str
    pid: int
    log_path: Path


def prefect_executable() -> str:
    """``prefect`` from this interpreter's environment, so server and client versions match."""
    beside = Path(sys.executable).parent / "prefect"
    return str(beside) if beside.is_file() else "prefect"


def _base_env(home: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """A clean environment with its own PREFECT_HOME; ``extra`` wins over the defaults."""
    defaults = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    return clean_env(_DROP, **{**defaults, **extra})


@contextmanager
def prefect_server(
    tmp_dir: str | Path,
    *,
    database_url: str | None = None,
    ui: bool = False,
    timeout: float = START_TIMEOUT_S,
    port: int | None = None,
) -> Iterator[PrefectServer]:
    """Run ``prefect server start`` on a free 127.0.0.1 port until the ``with`` block ends;
    ``port`` (and the same ``tmp_dir``) restarts a stopped server where its clients expect it.

    ``database_url`` (e.g. ``postgresql+asyncpg://...``) replaces the default SQLite file in
    the server's own PREFECT_HOME. The UI is off unless asked for (it costs startup time).
    """
    tmp_dir = Path(tmp_dir)
    home = tmp_dir / "server-home"
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    extra = {"PREFECT_SERVER_UI_ENABLED": "true" if ui else "false"}
    if database_url:
        extra["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    cmd = [prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    log_path = tmp_dir / "prefect-server.log"
    api_url = f"http://127.0.0.1:{port}/api"
    with server_process(cmd, name="Prefect server", where=f"{api_url}/health", log_path=log_path,
                        ready=lambda: http_ok(f"{api_url}/health"), timeout=timeout,
                        env=_base_env(home, extra), cwd=tmp_dir) as proc:
        yield PrefectServer(api_url=api_url, port=port, pid=proc.pid, home=home,
                            log_path=log_path)


@contextmanager
def prefect_worker(
    server: PrefectServer,
    pool: str,
    tmp_dir: str | Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    limit: int | None = None,
    timeout: float = WORKER_TIMEOUT_S,
) -> Iterator[PrefectWorker]:
    """Run a worker polling the ``process`` work pool ``pool`` (created if missing).

    ``env`` is added to the worker's environment; flow runs it starts inherit it (this is
    how they get MLFLOW_TRACKING_URI, AWS_*, ...). Ready once the server lists the worker.
    """
    tmp_dir = Path(tmp_dir)
    home = tmp_dir / f"worker-{pool}-home"
    home.mkdir(parents=True, exist_ok=True)
    worker_env = _base_env(home, {
        **server.env(),
        # Poll often: tests should not wait the default 10 s per run.
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        **dict(env or {}),
    })
    log_path = tmp_dir / f"prefect-worker-{pool}.log"
    cmd = [prefect_executable(), "worker", "start", "--pool", pool, "--type", "process",
           "--name", f"{pool}-test-worker"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    with server_process(cmd, name=f"Prefect worker for pool {pool!r}",
                        where=f"{server.api_url} (worker heartbeat)",
                        log_path=log_path, ready=lambda: _worker_registered(server, pool),
                        timeout=timeout, env=worker_env, cwd=cwd or tmp_dir,
                        stop_signal=signal.SIGTERM, stop_repeats=2, stop_timeout=10) as proc:
        yield PrefectWorker(pool=pool, pid=proc.pid, log_path=log_path)


def _worker_registered(server: PrefectServer, pool: str) -> bool:
    """True once the worker has sent its first heartbeat to the server."""
    request = urllib.request.Request(
        f"{server.api_url}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return bool(json.loads(response.read()))
    except (urllib.error.URLError, OSError, ValueError):
        return False


if __name__ == "__main__":  # manual check: python -m tests.servers.prefect_server
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, prefect_server(tmp) as server:
        print(server.api_url)
        input("Prefect server running; press Enter to stop ")
