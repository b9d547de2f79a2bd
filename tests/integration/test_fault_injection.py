"""SIGKILL `pilamim run` at seeded points in every stage, rerun, and compare the end state with
an uninterrupted run.

The kill takes the whole process group (the flow, its isolated stage processes, DVC and the
flow's temporary Prefect server): what a power cut or an OOM killer leaves. After each kill
the same command runs again; after the last one it must finish, and the checkout must hold
what a run that was never interrupted holds: the same metrics, one registry version with a
recorded decision, no MLflow run left RUNNING, `dvc status` clean. The kill delays come from
``PILAMIM_FAULT_SEED`` (default 0), so a failure is replayed by running with its seed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.fresh_checkout import fresh_checkout

EXPERIMENT = "pilamim-faults"
SEED = int(os.environ.get("PILAMIM_FAULT_SEED", "0"))
TINY = [
    "data.max_images_per_class=30",
    "model.size=micro", "model.depth=2", "model.img_size=16", "model.decoder_depth=1",
    "model.decoder_width=16", "model.decoder_heads=2",
    "pretrain.epochs=3", "pretrain.batch_size=16", "pretrain.lr=0.001",
    "pretrain.knn_every_epochs=0", "pretrain.figure_every_epochs=0",
    "probe.warmup_epochs=3", "probe.epochs=40", "probe.batch_size=16", "probe.base_lr=[10,100]",
    "finetune.warmup_epochs=0", "finetune.epochs=2", "finetune.batch_size=32",
    "register.floor=0.0",
]
COMPARED = {"metrics/probe.json": ("top1", "knn_top1", "val_top1"),
            "metrics/finetune.json": ("top1", "val_top1"),
            "metrics/pretrain.json": ("val_loss", "val_feature_std")}
RUN_TIMEOUT_S = 900


def _exists(*paths: str) -> Callable[[Path], bool]:
    return lambda root: all((root / p).exists() for p in paths)


# Where to kill: once the stage has started (its trigger file exists), after a seeded delay.
KILL_POINTS = {
    "pretrain": (_exists("data/prepared/dataset.json"), 4.0),
    "probe+finetune": (_exists("models/pretrain/encoder.safetensors"), 6.0),
    "register": (_exists("metrics/probe.json", "metrics/finetune.json"), 4.0),
}


def _command() -> list[str]:
    return [sys.executable, "-m", "pilamim.cli", "run",
            *(arg for item in TINY for arg in ("--set", item))]


def _run(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(), cwd=root, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _run_and_kill(root: Path, env: dict[str, str], trigger: Callable[[Path], bool],
                  delay: float) -> str:
    """Start the pipeline, SIGKILL its process group ``delay`` s after ``trigger`` holds;
    returns what happened ('killed' or 'finished first')."""
    proc = subprocess.Popen(_command(), cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not trigger(root) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    end = time.monotonic() + delay
    while proc.poll() is None and time.monotonic() < end:
        time.sleep(0.05)
    if proc.poll() is not None:
        proc.communicate()
        return "finished first"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    return "killed"


def _numbers(root: Path) -> dict[str, float]:
    out = {}
    for path, keys in COMPARED.items():
        values = json.loads((root / path).read_text())
        out.update({f"{path}:{k}": values[k] for k in keys if k in values})
    return out


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_equals_an_uninterrupted_run(tmp_path):
    reference_root = tmp_path / "reference"
    _run(reference_root, fresh_checkout(reference_root, PILAMIM_EXPERIMENT=EXPERIMENT))
    reference = _numbers(reference_root)
    assert {"metrics/probe.json:top1", "metrics/finetune.json:top1"} <= set(reference)

    root = tmp_path / "faulted"
    env = fresh_checkout(root, PILAMIM_EXPERIMENT=EXPERIMENT)
    rng = random.Random(SEED)
    outcomes = {}
    for point, (trigger, max_delay) in KILL_POINTS.items():
        delay = rng.uniform(0.0, max_delay)
        outcomes[point] = (round(delay, 2), _run_and_kill(root, env, trigger, delay))
    _run(root, env)

    context = f"seed {SEED}, kills {outcomes}"
    assert _numbers(root) == pytest.approx(reference, abs=1e-6), context
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions("name = 'pilamim-encoder'")
    assert len(versions) == 1, context
    assert versions[0].tags.get("decision") == "champion", context
    experiment = client.get_experiment_by_name(EXPERIMENT)
    running = client.search_runs([experiment.experiment_id],
                                 filter_string="attributes.status = 'RUNNING'")
    assert running == [], context
    register = json.loads((root / "metrics/register.json").read_text())
    assert register["version"] == 1 and register["action"] == "champion", context
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, env=env,
                            capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, (status.stdout, context)
