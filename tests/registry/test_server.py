"""Registration through a real `mlflow server` (loopback, free port); load in a new process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pilamim.registry import store
from pilamim.stages import register as register_step
from pilamim.tracking import runs, server
from tests.mlflow_store import FEATURE_DIM, write_metrics, write_prepared

LOAD_SCRIPT = """
import sys, mlflow, numpy as np
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(np.zeros((3, 16, 16, 1), np.uint8))    # raw pixels, as PIL/numpy give
print("SHAPE", out.shape[0], out.shape[1])
"""


@pytest.mark.slow
def test_register_through_server_and_load_champion_in_fresh_process(
        tmp_path, params, encoder_dir, mlflow_server, monkeypatch):
    url, stop_server = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    server.check_tracking_reachable(url)
    write_prepared(tmp_path / "data" / "prepared")
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.5, top5=0.9)
    record = register_step.register(params)
    assert record["action"] == "champion"
    # Artifacts went through the server's proxy, not into the working folder.
    assert not (tmp_path / "mlartifacts").exists()
    assert any(Path(tmp_path / "server" / "artifacts").rglob("MLmodel"))

    uri = f"models:/{params.register.model_name}@champion"
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    env.pop("MLFLOW_RUN_ID", None)
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, uri], capture_output=True,
                          text=True, timeout=240, env=env, cwd=tmp_path / "server")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"SHAPE 3 {FEATURE_DIM}" in done.stdout
    assert json.loads((tmp_path / "metrics" / "register.json").read_text())["version"] == 1

    # No @champion is a normal state on the server too (its error codes differ from SQLite's).
    client = store.registry_client()
    client.delete_registered_model_alias(params.register.model_name, "champion")
    assert store.get_alias(client, params.register.model_name) is None
    again = register_step.register(params)
    assert again["action"] == "champion" and again["champion_version_before"] is None

    # The server dying mid-stage ends the stage with one clear error, in bounded time.
    with pytest.raises(server.TrackingUnavailable, match="output files are saved"):
        with runs.stage_run("probe", params, log_system_metrics=False) as run:
            run.logger.log_metrics({"loss": 1.0}, step=0)
            stop_server()
            start = time.monotonic()
            run.logger.log_metrics({"loss": 0.5}, step=1)
    assert time.monotonic() - start < 60
