"""SIGKILL `pilamim run` inside named stages, rerun, and compare the end state with an
uninterrupted run.

The kill takes the whole process group (the flow, DVC, the stage command DVC started and the
flow's temporary Prefect server): what a power cut or an OOM killer leaves. Each kill point
waits for evidence that the run is *inside* its stage — the stage command is running and its
MLflow run is open (pretraining: it has also saved a checkpoint to resume from) — then a
seeded delay, then freezes the group (SIGSTOP), checks that the stage still has not finished,
and kills it. A run that ends before its kill point, or a stage that finished before the kill,
fails the test: it must prove every kill happened where it says.

After the last kill the same command runs again and must finish, leaving what the
uninterrupted run (:func:`tests.fresh_checkout.uninterrupted_run`) left: the same metrics,
one registry version with a recorded decision, no MLflow run left RUNNING, `dvc status`
clean; and it reruns only the stage killed last, DVC having recorded the others. The delays
come from ``PILAMIM_FAULT_SEED`` (default 0), so a failure is replayed by running with its seed.
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
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pilamim.stages import STAGES
from tests.fresh_checkout import (
    EXPERIMENT,
    RUN_TIMEOUT_S,
    fresh_checkout,
    run_command,
    summary_of,
    uninterrupted_run,
)

SEED = int(os.environ.get("PILAMIM_FAULT_SEED", "0"))
COMPARED = {"metrics/probe.json": ("top1", "knn_top1", "val_top1"),
            "metrics/finetune.json": ("top1", "val_top1"),
            "metrics/pretrain.json": ("val_loss", "val_feature_std")}
POLL_S = 0.05
# The seeded delay after the evidence, at most: well inside the tracked work of each killed
# stage, which lasts about 2 s (pretrain), 1.5 s (finetune) and 4 s (register) on an idle
# 2-core machine (TINY), longer on a loaded one.
MAX_DELAY_S = 0.3


@dataclass(frozen=True)
class KillPoint:
    stage: str
    done_file: str  # written last by the stage (atomically): absent = not finished
    extra: tuple[str, ...] = ()  # files that must exist too (a checkpoint to resume from)


KILL_POINTS = (
    KillPoint("pretrain", "metrics/pretrain.json", ("models/pretrain/checkpoint.pt",)),
    KillPoint("finetune", "metrics/finetune.json"),
    KillPoint("register", "metrics/register.json"),
)


def stage_processes(session: int, stage: str) -> list[psutil.Process]:
    """The live ``pilamim <stage>`` commands of the process group led by ``session``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            argv = proc.info["cmdline"] or []
            ours = os.getsid(proc.pid) == session
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
        alive = proc.info["status"] != psutil.STATUS_ZOMBIE  # exited, not yet reaped
        if ours and alive and any(Path(arg).name == "pilamim" and argv[i + 1:i + 2] == [stage]
                                  for i, arg in enumerate(argv)):
            found.append(proc)
    return found


def stage_run_open(root: Path, stage: str, since_ms: int) -> bool:
    """True when the stage opened its MLflow run after ``since_ms`` and it is RUNNING (it has
    imported, checked its inputs and begun). Asked only once a stage process is running: the
    flow has created the store by then (two processes creating it at once would both fail)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return experiment is not None and bool(client.search_runs(
        [experiment.experiment_id], f"attributes.run_name = '{stage}' AND "
        f"attributes.status = 'RUNNING' AND attributes.start_time > {since_ms}"))


def inside(root: Path, session: int, point: KillPoint, since_ms: int) -> bool:
    """The evidence: the stage is at work and has not finished. The MLflow store is asked
    only once the stage command runs, so its first (slow) query overlaps the command's start."""
    return (bool(stage_processes(session, point.stage))
            and stage_run_open(root, point.stage, since_ms)
            and all((root / f).exists() for f in point.extra)
            and not (root / point.done_file).exists())


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen) -> bool:
    """Poll ``condition`` until it holds (True) or the run ends (False)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "timed out"
        time.sleep(POLL_S)
    return True


def run_and_kill(root: Path, env: dict[str, str], point: KillPoint, delay: float) -> str:
    """Start the pipeline; SIGKILL its group inside ``point.stage``, ``delay`` s after the
    evidence; check that the kill landed there."""
    since_ms = int(time.time() * 1000)
    proc = subprocess.Popen(run_command(), cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    stages, finished = [], False
    try:
        reached = wait_for(lambda: inside(root, proc.pid, point, since_ms), proc)
        if reached:
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGSTOP)  # freeze: what we check next stays true
            stages = stage_processes(proc.pid, point.stage)
            finished = (root / point.done_file).exists()
            os.killpg(proc.pid, signal.SIGKILL)
    except BaseException:
        if proc.poll() is None:  # the test failed before its kill: leave nothing running
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        _, stderr = proc.communicate()  # a run the kill missed goes on to its end here
    assert reached, (f"the run ended (exit {proc.returncode}) before {point.stage} was at "
                     f"work: {stderr[-3000:]}")
    assert stages and not finished, (
        f"kill point {point.stage} (delay {delay:.2f} s) did not land inside the stage: "
        f"stage process {'running' if stages else 'gone'}, {point.done_file} "
        f"{'written' if finished else 'absent'}")
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed: {proc.returncode}"
    assert not (root / point.done_file).exists(), f"{point.stage} finished after the kill"
    return f"killed in {point.stage} ({stages[0].pid}) after {delay:.2f} s"


def numbers(root: Path) -> dict[str, float]:
    out = {}
    for path, keys in COMPARED.items():
        values = json.loads((root / path).read_text())
        out.update({f"{path}:{k}": values[k] for k in keys if k in values})
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("uninterrupted-run")
def test_sigkill_inside_each_stage_then_rerun_equals_an_uninterrupted_run(tmp_path,
                                                                         tmp_path_factory):
    reference = numbers(uninterrupted_run(tmp_path_factory.getbasetemp()).root)
    assert {"metrics/probe.json:top1", "metrics/finetune.json:top1"} <= set(reference)

    root = tmp_path / "faulted"
    env = fresh_checkout(root, PILAMIM_EXPERIMENT=EXPERIMENT)
    rng = random.Random(SEED)
    kills = [run_and_kill(root, env, point, rng.uniform(0.0, MAX_DELAY_S))
             for point in KILL_POINTS]
    done = subprocess.run(run_command(), cwd=root, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    context = f"seed {SEED}, {kills}"
    assert done.returncode == 0, (context, done.stderr[-4000:])
    # DVC recorded every stage that finished before a kill: only the last one killed reruns
    last = KILL_POINTS[-1].stage
    assert summary_of(done.stdout)["stages"] == " ".join(
        f"{s}={'ran' if s == last else 'skipped'}" for s in STAGES), context

    assert numbers(root) == pytest.approx(reference, abs=1e-6), context
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
