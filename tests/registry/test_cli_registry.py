"""`pilamim models` and `pilamim promote` as a person types them, on a real SQLite store."""

import os
import subprocess
import sys


def _pilamim(tmp_path, *args):
    env_uri = f"sqlite:///{tmp_path}/mlflow.db"
    return subprocess.run([sys.executable, "-m", "pilamim.cli", *args], cwd=tmp_path,
                          capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": env_uri})


def test_models_and_promote_errors_are_one_clear_line(tmp_path):
    listed = _pilamim(tmp_path, "models")
    assert listed.returncode == 0, listed.stderr
    done = _pilamim(tmp_path, "promote", "pilamim-encoder", "7")
    assert done.returncode == 1
    assert "no registered model 'pilamim-encoder'" in done.stderr
    assert "Traceback" not in done.stderr
