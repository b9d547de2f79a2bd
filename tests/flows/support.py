"""Helpers for the flow tests: tiny params, a temporary git + DVC checkout like a user's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pilamim.config import Params
from pilamim.params_files import dump_params
from tests.fresh_checkout import REPO, fresh_checkout

__all__ = ["EXPERIMENT", "FOREIGN_ENV", "REPO", "clear_mlflow", "dvc", "make_dvc_repo",
           "tiny_params", "tracked_env"]

EXPERIMENT = "pilamim-flow-test"

# Variables that would link our runs to someone else's (see pilamim.tracking).
FOREIGN_ENV = ("PILAMIM_PIPELINE_ID", "PILAMIM_PARENT_RUN_ID", "MLFLOW_RUN_ID",
               "PILAMIM_RUN_TAGS", "PILAMIM_REPORT_FILE", "PREFECT__FLOW_RUN_ID",
               "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")


def tracked_env(mp: pytest.MonkeyPatch, folder: Path) -> str:
    """MLflow writes only to ``folder/mlflow.db``; no outer pipeline/run ids leak in."""
    for name in FOREIGN_ENV:
        mp.delenv(name, raising=False)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mp.setenv("PILAMIM_EXPERIMENT", EXPERIMENT)
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    return uri


def tiny_params() -> Params:
    """Seconds-long stages on the default relative paths (a micro model, a few epochs)."""
    p = Params()
    p.data.max_images_per_class = 30
    p.model = p.model.model_copy(update=dict(
        size="micro", depth=None, img_size=16, decoder_depth=1, decoder_width=16,
        decoder_heads=2))
    p.pretrain.epochs, p.pretrain.batch_size, p.pretrain.lr = 1, 16, 1e-3
    p.pretrain.warmup_epochs, p.pretrain.device = 0, "cpu"
    p.probe.warmup_epochs, p.probe.epochs, p.probe.batch_size = 1, 8, 16
    p.probe.base_lr, p.probe.device = 100.0, "cpu"
    p.finetune.warmup_epochs, p.finetune.epochs, p.finetune.batch_size = 0, 1, 32
    p.finetune.device = "cpu"
    p.register.floor = 0.0          # any first version becomes @champion
    return p


def dvc(cwd: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"dvc {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


def make_dvc_repo(root: Path, params: Params) -> Path:
    """A fresh git + DVC checkout of this repository (:func:`tests.fresh_checkout.fresh_checkout`)
    with ``params`` written to ``params/``."""
    fresh_checkout(root)
    dump_params(params, root / "params")
    return root


def clear_mlflow() -> None:
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
