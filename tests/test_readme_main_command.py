"""The README's main command, `pilamim run`, end to end in a fresh git + DVC checkout.

Same command and params files as a user gets, with the budget cut by `--set` so CI can
afford it (:data:`tests.fresh_checkout.TINY`): every stage runs, the registry ends with
@champion, and `dvc repro` afterwards has nothing to do. The run is shared with the
fault-injection test (:func:`tests.fresh_checkout.uninterrupted_run`), which compares with it.
"""

import json
import subprocess
import sys

import pytest
import yaml

from pilamim.stages import STAGES
from tests.fresh_checkout import summary_of, uninterrupted_run


@pytest.mark.slow
@pytest.mark.xdist_group("uninterrupted-run")
def test_pilamim_run_end_to_end(tmp_path_factory):
    run = uninterrupted_run(tmp_path_factory.getbasetemp())
    done, root = run.done, run.root
    # progress and results, not MLflow's system-metrics chatter, DVC's lock-file lines or the
    # stage commands' own result JSON (they report to the flow, not to stdout)
    output = done.stdout + done.stderr
    for noise in ("system_metrics", "Updating lock file", "Downloading artifacts"):
        assert noise not in output, noise
    assert "pretrain finished in" in done.stderr
    assert done.stdout.count('"status"') == 1, done.stdout
    summary = summary_of(done.stdout)
    assert summary["status"] == "completed" and summary["metrics"]["probe_top1"] > 0.1
    for path in ("data/prepared/manifest.csv", "models/pretrain/encoder.safetensors",
                 "metrics/probe.json", "metrics/finetune.json", "metrics/register.json"):
        assert (root / path).exists(), path
    register = json.loads((root / "metrics/register.json").read_text())
    assert register["action"] == "champion"

    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, env=run.env,
                            capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout
    assert set(yaml.safe_load((root / "dvc.lock").read_text())["stages"]) == set(STAGES)
