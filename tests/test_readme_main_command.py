"""The README's main command, `pilamim run`, end to end in a fresh git + DVC checkout.

Same command and params files as a user gets, with the budget cut by `--set` so CI can
afford it: every stage runs, the registry ends with @champion, and `dvc repro` afterwards
has nothing to do.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.max_images_per_class=30",
    "model.size=micro", "model.depth=2", "model.img_size=16", "model.decoder_depth=1",
    "model.decoder_width=16", "model.decoder_heads=2",
    "pretrain.epochs=2", "pretrain.batch_size=16", "pretrain.lr=0.001",
    "probe.warmup_epochs=3", "probe.epochs=40", "probe.batch_size=16", "probe.base_lr=100",
    "finetune.warmup_epochs=0", "finetune.epochs=1", "finetune.batch_size=32",
    "register.floor=0.0",
]


@pytest.mark.slow
def test_pilamim_run_end_to_end(tmp_path):
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("dvc.yaml", "params", ".dvcignore", "pilamim"):  # pilamim/: DVC code deps
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, tmp_path / name, ignore=ignore)
        else:
            shutil.copy(src, tmp_path / name)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "PREFECT_HOME": str(tmp_path / ".prefect"), "GIT_CONFIG_NOSYSTEM": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PREFECT_API_URL", None)
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"],
                [*dvc, "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)

    sets = [arg for item in TINY for arg in ("--set", item)]
    done = subprocess.run([sys.executable, "-m", "pilamim.cli", "run", *sets], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["status"] == "completed" and summary["metrics"]["probe_top1"] > 0.1
    for path in ("data/prepared/manifest.csv", "models/pretrain/encoder.safetensors",
                 "metrics/probe.json", "metrics/finetune.json", "metrics/register.json"):
        assert (tmp_path / path).exists(), path
    register = json.loads((tmp_path / "metrics/register.json").read_text())
    assert register["action"] == "champion"

    status = subprocess.run([*dvc, "status"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, check=True)
    assert "up to date" in status.stdout, status.stdout
