"""A fresh git + DVC checkout of the pipeline in a folder, as the README's main command expects."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# pilamim/ is copied because dvc.yaml names its files as code deps
CHECKOUT_FILES = ("dvc.yaml", "params", ".dvcignore", "pilamim")
# Variables that would point the run at someone else's servers or runs.
FOREIGN_ENV = ("PREFECT_API_URL", "PILAMIM_PIPELINE_ID", "PILAMIM_PARENT_RUN_ID",
               "MLFLOW_RUN_ID")


def fresh_checkout(root: Path, **env: str) -> dict[str, str]:
    """Copy the pipeline into ``root``, ``git init`` + ``dvc init`` it; return the environment
    a run there uses (MLflow and Prefect state inside ``root``, plus ``env``)."""
    root.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in CHECKOUT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=ignore)
        else:
            shutil.copy(src, root / name)
    run_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
               "PREFECT_HOME": str(root / ".prefect"), "GIT_CONFIG_NOSYSTEM": "1",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
    for name in FOREIGN_ENV:
        run_env.pop(name, None)
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"],
                [*dvc, "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=root, env=run_env, check=True, capture_output=True)
    return run_env
