"""The MLflow fixtures (:mod:`tests.mlflow_store`): every test here gets a private SQLite store;
:func:`mlflow_server` starts a real ``mlflow server`` for the tests that need one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.mlflow_store import (  # noqa: F401
    empty_store,
    encoder_dir,
    free_port,
    mlflow_store,
    params,
    stop_process_group,
    wait_until_up,
)


@pytest.fixture
def mlflow_server(tmp_path, empty_store):  # noqa: F811 - the fixture imported above
    """`mlflow server` on 127.0.0.1:<free port>, stopped (its whole process group) afterwards."""
    db = tmp_path / "server" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(empty_store, db)
    port = free_port()
    log = open(tmp_path / "server" / "log.txt", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{db}",
         "--artifacts-destination", str(tmp_path / "server" / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, f"{uri}/health", tmp_path / "server" / "log.txt", "mlflow server", 90)
        yield uri, lambda: stop_process_group(proc)
    finally:
        stop_process_group(proc)
        log.close()

