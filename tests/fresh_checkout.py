"""A fresh git + DVC checkout of the pipeline in a folder, as the README's main command expects;
and one uninterrupted ``pilamim run`` there, shared by the tests that need one.

Every test that runs stages under DVC builds its checkout here (the flow tests through
:func:`tests.flows.support.make_dvc_repo`), so they all see the same files a user's clone has.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# pilamim/ is copied because dvc.yaml names its files as code deps
CHECKOUT_FILES = ("dvc.yaml", "params", ".dvcignore", "pilamim")
# Variables that would point the run at someone else's servers or runs.
FOREIGN_ENV = ("PREFECT_API_URL", "PILAMIM_PIPELINE_ID", "PILAMIM_PARENT_RUN_ID",
               "PILAMIM_RUN_TOKEN", "PILAMIM_RUN_TAGS", "PILAMIM_REPORT_FILE", "MLFLOW_RUN_ID")
# The README's main command with the budget cut so CI can afford it. Pretraining (~80 steps,
# about 2 s of work on an idle 2-core machine) checkpoints every 5 steps, so a run killed in it
# has a checkpoint to resume from; fine-tuning gets 3 epochs (about 1.5 s), so the
# fault-injection test can be sure to kill it mid-work.
TINY = [
    "data.max_images_per_class=30",
    "model.size=micro", "model.depth=2", "model.img_size=16", "model.decoder_depth=1",
    "model.decoder_width=16", "model.decoder_heads=2",
    "pretrain.epochs=6", "pretrain.batch_size=16", "pretrain.lr=0.001",
    "pretrain.checkpoint_every_steps=5",
    "pretrain.knn_every_epochs=0", "pretrain.figure_every_epochs=0",
    "probe.warmup_epochs=3", "probe.epochs=40", "probe.batch_size=16", "probe.base_lr=[10,100]",
    "finetune.warmup_epochs=0", "finetune.epochs=3", "finetune.batch_size=32",
    "register.floor=0.0",
]
EXPERIMENT = "pilamim-run"
RUN_TIMEOUT_S = 1500


def fresh_checkout(root: Path, **env: str) -> dict[str, str]:
    """Copy the pipeline into ``root``, ``git init`` + ``dvc init`` it; return the environment
    a run there uses (MLflow and Prefect state inside ``root``, plus ``env``)."""
    root.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in CHECKOUT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=ignore, dirs_exist_ok=True)
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


def run_command() -> list[str]:
    """``pilamim run`` with :data:`TINY`, as a user types it."""
    return [sys.executable, "-m", "pilamim.cli", "run",
            *(arg for item in TINY for arg in ("--set", item))]


def summary_of(stdout: str) -> dict[str, Any]:
    """The summary ``pilamim run`` prints last (a JSON object)."""
    return json.loads(stdout[stdout.index("{"):])


@dataclass(frozen=True)
class Run:
    root: Path
    env: dict[str, str]
    done: subprocess.CompletedProcess


@functools.cache
def uninterrupted_run(base: Path) -> Run:
    """One ``pilamim run`` in a fresh checkout under ``base``, never interrupted: the README
    test checks it, the fault-injection test compares its own end state with it. Computed once
    per process (tests that use it share an xdist group, so one worker runs both)."""
    root = base / "uninterrupted-run"
    env = fresh_checkout(root, PILAMIM_EXPERIMENT=EXPERIMENT)
    done = subprocess.run(run_command(), cwd=root, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return Run(root, env, done)
