"""Several workers register against one tracking server at once: the gate acts in turn.

As a team runs it: one ``mlflow server``, several checkouts each registering its own encoder,
started together. Registers decide in version order (:func:`pilamim.registry.store.await_turn`),
so the registry ends as if they had run one after the other: ``@champion`` on the best version,
and every version's decision compared against the champion of the version before it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pilamim.registry import store
from pilamim.registry.promotion import CHALLENGER, CHAMPION, Decision
from pilamim.stages import register as register_step
from tests.mlflow_store import export_tiny_encoder, write_metrics, write_prepared

# Each worker imports everything first, then waits for the go file, so the registers really
# start together (imports take seconds and would otherwise spread them out).
_WORKER = """
import os, sys, time
from pathlib import Path
from pilamim.config import Params
from pilamim.stages.runner import execute
go = Path(sys.argv[1])
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.01)
execute("register", Params())
"""


def _checkout(root: Path, value: float, seed: int) -> Path:
    """A worker's checkout: its own encoder (other weights), the shared data, its probe value."""
    root.mkdir(parents=True)
    here = Path.cwd()
    os.chdir(root)
    try:
        write_prepared(root / "data" / "prepared")
        export_tiny_encoder(root / "models" / "pretrain", seed=seed)
        write_metrics(root / "metrics" / "probe.json", top1=value, top5=0.9)
        write_metrics(root / "metrics" / "finetune.json", top1=0.6, top5=0.9)
    finally:
        os.chdir(here)
    return root


def _register_together(checkouts: list[Path], url: str, meeting: Path) -> list[dict]:
    """``pilamim register``'s stage in one process per checkout, released at the same moment
    once all have imported; their ``metrics/register.json`` records."""
    meeting.mkdir()
    go = meeting / "go"
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    env.pop("MLFLOW_RUN_ID", None)
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(go)], cwd=c, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in checkouts]
    deadline = time.monotonic() + 300
    while (len(list(meeting.glob("ready-*"))) < len(procs) and time.monotonic() < deadline
           and all(p.poll() is None for p in procs)):
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    return [json.loads((c / "metrics" / "register.json").read_text()) for c in checkouts]


def _assert_serial(records: list[dict], champion_before: int) -> int:
    """Sorted by version, each decision was taken against the champion the previous one left;
    returns the champion after the last."""
    champion = champion_before
    for record in sorted(records, key=lambda r: r["version"]):
        assert record["champion_version_before"] == champion, records
        if record["action"] == CHAMPION:
            champion = record["version"]
    return champion


@pytest.mark.slow
def test_concurrent_registers_end_on_the_best_version(tmp_path, params, encoder_dir,
                                                      mlflow_server, monkeypatch):
    url, _ = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    write_prepared(tmp_path / "data" / "prepared")
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.50, top5=0.9)
    first = register_step.register(params)
    assert first["action"] == CHAMPION and first["version"] == 1
    name = params.register.model_name
    client = MlflowClient(tracking_uri=url)

    champion = 1
    for round_, values in enumerate([(0.70, 0.75, 0.60), (0.80, 0.85, 0.78)]):
        checkouts = [_checkout(tmp_path / f"worker{round_}-{i}", v, seed=10 * round_ + i + 1)
                     for i, v in enumerate(values)]
        records = _register_together(checkouts, url, tmp_path / f"go{round_}")
        best = max(records, key=lambda r: r["gate_value"])
        holder = client.get_model_version_by_alias(name, CHAMPION)
        assert int(holder.version) == best["version"], (records, holder.version)
        champion = _assert_serial(records, champion)
        assert champion == best["version"]
        tags = {r["version"]: client.get_model_version(name, str(r["version"])).tags
                for r in records}
        assert all(tags[r["version"]]["decision"] == r["action"] for r in records)


def test_a_register_waits_for_the_version_before_it(tmp_path, params, encoder_dir):
    """A version whose register still runs (elsewhere) is waited for; its decision releases
    the next one; one that never decides ends the wait with an error naming it."""
    write_prepared(tmp_path / "data" / "prepared")
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.50, top5=0.9)
    register_step.register(params)
    client = MlflowClient()
    name = params.register.model_name
    first = client.get_model_version(name, "1")
    # Version 2, undecided, of a register that is still RUNNING (its run is open, its owner
    # another host): as version 3's register sees a worker that is slower than itself.
    run = client.create_run(client.get_experiment_by_name("pilamim-test").experiment_id,
                            tags={"pilamim.owner": "another-host:1:1.00"})
    second = client.create_model_version(name, first.source, run_id=run.info.run_id)
    third = client.create_model_version(name, first.source, run_id=run.info.run_id)

    with pytest.raises(store.RegistryBusy, match=rf"version {second.version} of '{name}'.*"
                       r"still RUNNING.*turn_timeout_s"):
        store.await_turn(client, name, third.version, timeout_s=0.5, poll_s=0.1)

    def decide_later():
        time.sleep(1.0)
        store.apply_decision(client, name, second.version,
                             Decision(CHALLENGER, "slow worker", "probe_top1", 0.4))

    worker = threading.Thread(target=decide_later)
    start = time.monotonic()
    worker.start()
    assert store.await_turn(client, name, third.version, timeout_s=30, poll_s=0.1) == []
    worker.join()
    assert time.monotonic() - start >= 0.9
    # Versions above are not waited for, and a run that ended without deciding is abandoned.
    client.set_terminated(run.info.run_id, "KILLED")
    assert store.await_turn(client, name, second.version, timeout_s=5) == [str(third.version)]
    assert client.get_model_version(name, third.version).tags["decision"] == store.ABANDONED
