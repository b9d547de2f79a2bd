"""Start a real MLflow tracking server on loopback for tests.

``mlflow server`` with a SQL backend store (PostgreSQL in the integration suite) and
``--artifacts-destination`` (``s3://...`` on SeaweedFS, or a local folder). The S3 endpoint
and credentials go into the SERVER's environment only: clients talk to the server over
HTTP and the server proxies artifacts, so a client needs no S3 credentials at all.

Usage::

    with mlflow_server(tmp_path, backend_store_uri=pg.url,
                       artifacts_destination="s3://mlflow/artifacts", s3_env=s3.env()) as ml:
        mlflow.set_tracking_uri(ml.tracking_uri)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.servers._process import clean_env, free_port, http_ok, server_process

# A fresh PostgreSQL store runs all of MLflow's migrations first: allow for slow shared CPUs.
START_TIMEOUT_S = 120.0
# Settings a server must not inherit from the developer's shell or from other tests.
_DROP = ("MLFLOW_", "AWS_", "PREFECT_API_")


@dataclass(frozen=True)
class MlflowServer:
    """A running tracking server."""

    tracking_uri: str
    port: int
    pid: int
    backend_store_uri: str
    artifacts_destination: str
    log_path: Path

    def env(self) -> dict[str, str]:
        """What a client needs: the tracking URI, nothing else (no S3 credentials)."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri}


def mlflow_executable() -> str:
    """``mlflow`` from this interpreter's environment, so server and client versions match."""
    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.is_file() else "mlflow"


@contextmanager
def mlflow_server(
    tmp_dir: str | Path,
    *,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    s3_env: Mapping[str, str] | None = None,
    workers: int = 1,
    job_execution: bool = False,
    timeout: float = START_TIMEOUT_S,
    port: int | None = None,
) -> Iterator[MlflowServer]:
    """Run ``mlflow server`` on a free 127.0.0.1 port until the ``with`` block ends.

    Defaults: a SQLite store and a local artifact folder inside ``tmp_dir``. ``s3_env``
    (e.g. ``S3Server.env()``) is added to the server's environment only. ``port`` restarts a
    stopped server where its clients expect it.
    """
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    backend_store_uri = backend_store_uri or f"sqlite:///{tmp_dir / 'mlflow.db'}"
    artifacts_destination = artifacts_destination or str(tmp_dir / "artifacts")
    port = port or free_port()
    cmd = [
        mlflow_executable(), "server",
        "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", artifacts_destination,
        "--workers", str(workers),
    ]
    env = clean_env(_DROP, **{
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "PYTHONUNBUFFERED": "1",
        # The GenAI job runner (seven huey consumer processes) is not used by the pipeline;
        # off, the server starts faster and needs ~1 GB less memory.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true" if job_execution else "false",
        **dict(s3_env or {}),
    })
    log_path = tmp_dir / "mlflow-server.log"
    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, name="MLflow server", where=f"{url}/health", log_path=log_path,
                        ready=lambda: http_ok(f"{url}/health"), timeout=timeout, env=env,
                        cwd=tmp_dir) as proc:
        yield MlflowServer(tracking_uri=url, port=port, pid=proc.pid,
                           backend_store_uri=backend_store_uri,
                           artifacts_destination=artifacts_destination, log_path=log_path)


if __name__ == "__main__":  # manual check: python -m tests.servers.mlflow_server
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, mlflow_server(tmp) as server:
        print(server.tracking_uri)
        input("MLflow server running; press Enter to stop ")
