"""The README's main command, `pilamim run`, end to end in a fresh git + DVC checkout.

Same command and params files as a user gets, with the budget cut by `--set` so CI can
afford it: every stage runs, the registry ends with @champion, and `dvc repro` afterwards
has nothing to do.
"""

import json
import subprocess
import sys

import pytest

from tests.fresh_checkout import fresh_checkout

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
    env = fresh_checkout(tmp_path)
    dvc = [sys.executable, "-m", "dvc"]

    sets = [arg for item in TINY for arg in ("--set", item)]
    done = subprocess.run([sys.executable, "-m", "pilamim.cli", "run", *sets], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    # progress and results, not MLflow's system-metrics chatter or DVC's lock-file lines
    output = done.stdout + done.stderr
    for noise in ("system_metrics", "Updating lock file", "Downloading artifacts"):
        assert noise not in output, noise
    assert "pretrain finished in" in done.stderr
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
