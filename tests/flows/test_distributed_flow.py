"""The flow a GPU work pool runs: it launches torchrun, so the Prefect run ends Completed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient
from pilamim_flows.torchrun_job import placement, pretrain_distributed, torchrun_command
from prefect.settings import PREFECT_API_URL, PREFECT_HOME

from pilamim.params_files import dump_params
from pilamim.train.distributed import ENV_PLACEMENT_DIR, report_placement
from tests.conftest import micro_run_params
from tests.flows.support import FOREIGN_ENV, clear_mlflow, tracked_env
from tests.servers._process import free_port

# One node's flow run, as a worker would start it in its own checkout (the working directory).
NODE_RUN = """
import json, sys
from pilamim_flows.torchrun_job import pretrain_distributed
endpoint, job, out = sys.argv[1:]
state = pretrain_distributed(nproc_per_node="1", nnodes="2", rdzv_endpoint=endpoint,
                             rdzv_id=job, return_state=True)
answer = {"completed": state.is_completed(), "message": state.message}
if state.is_completed():
    answer["result"] = state.result()
open(out, "w").write(json.dumps(answer))
"""


def test_torchrun_command_for_one_node_of_eight_gpus_and_for_two_nodes():
    one = torchrun_command("8")
    assert one[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nnodes=1" in one and "--nproc-per-node=8" in one
    assert one[one.index("-m", 3) + 1:] == ["pilamim.cli", "pretrain", "--params", "params"]
    two = torchrun_command("gpu", "2", "node0:29400", "job-17",
                           overrides=["pretrain.epochs=400"])
    assert {"--nnodes=2", "--rdzv-endpoint=node0:29400", "--rdzv-id=job-17",
            "--rdzv-backend=c10d"} <= set(two)
    assert two[-2:] == ["--set", "pretrain.epochs=400"]


@pytest.mark.slow
def test_flow_runs_pretrain_under_torchrun_and_completes(prefect_harness, tiny_prepared,
                                                         tmp_path, monkeypatch):
    tracked_env(monkeypatch, tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    dump_params(micro_run_params(tmp_path, tiny_prepared, epochs=1, batch_size=4,
                                 figure_every_epochs=0), tmp_path / "params")
    try:
        state = pretrain_distributed(nproc_per_node="2", rdzv_endpoint=f"127.0.0.1:{free_port()}",
                                     return_state=True)
    finally:
        clear_mlflow()
    assert state.is_completed(), state
    metrics = state.result()
    assert metrics["world_size"] == 2, metrics
    assert json.loads((tmp_path / "metrics/pretrain.json").read_text()) == metrics
    assert (tmp_path / "models/pretrain/encoder.safetensors").is_file()
    # rank 0 alone recorded the stage: one MLflow run, with the loss curve
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].data.tags["pilamim.stage"] == "pretrain"
    assert "pretrain/loss" in runs[0].data.metrics, runs[0].data.metrics


def test_a_failing_launch_fails_the_flow_run(prefect_harness, tiny_prepared, tmp_path,
                                             monkeypatch):
    tracked_env(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    dump_params(micro_run_params(tmp_path, str(tmp_path / "no-such-data")), tmp_path / "params")
    state = pretrain_distributed(nproc_per_node="1", rdzv_endpoint=f"127.0.0.1:{free_port()}",
                                 return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match="torchrun exited with status"):
        state.result()


def test_ranks_report_where_they_ran_and_the_last_attempt_counts(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_PLACEMENT_DIR, str(tmp_path))
    for rank, group, restart in ((0, 0, 0), (2, 1, 0), (3, 1, 1), (2, 1, 1)):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("GROUP_RANK", str(group))
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart))
        report_placement()
    # rank 0's report is the first attempt's; after the restart this node ran ranks 2 and 3
    assert placement(tmp_path) == {"node_rank": 1, "ranks": [2, 3], "world_size": 4}


def _node_env(node: Path, api_url: str) -> dict[str, str]:
    """A worker's environment on its own machine: its own MLflow store, the shared Prefect API."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env.update(PREFECT_API_URL=api_url, PREFECT_HOME=str(PREFECT_HOME.value()),
               MLFLOW_TRACKING_URI=f"sqlite:///{node / 'mlflow.db'}",
               PILAMIM_EXPERIMENT="pilamim-flow-test", OMP_NUM_THREADS="1")
    return env


def _run_node(node: Path, endpoint: str, job: str, api_url: str) -> dict:
    out = node / "answer.json"
    done = subprocess.run([sys.executable, "-c", NODE_RUN, endpoint, job, str(out)], cwd=node,
                          env=_node_env(node, api_url), capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0 and out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_nodes_without_a_shared_disk_both_complete(prefect_harness, tiny_prepared, tmp_path):
    """Two checkouts stand for two machines: each has its own params and outputs, nothing
    shared but the data (an input) and the rendezvous endpoint. The node that held global rank
    0 returns the metrics it wrote; the other says where its ranks ran and returns no metrics,
    not the stale file an earlier run left in its checkout."""
    nodes = [tmp_path / "node-a", tmp_path / "node-b"]
    stale = {"steps": -1, "note": "left by an earlier run"}
    for node in nodes:
        dump_params(micro_run_params(node, tiny_prepared, epochs=1, batch_size=16,
                                     figure_every_epochs=0, knn_every_epochs=0),
                    node / "params")
        (node / "metrics").mkdir()
        (node / "metrics" / "pretrain.json").write_text(json.dumps(stale))
    endpoint, job = f"127.0.0.1:{free_port()}", f"job-{tmp_path.name}"
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda n: _run_node(n, endpoint, job, PREFECT_API_URL.value()),
                                nodes))
    assert all(a["completed"] for a in answers), answers
    results = [a["result"] for a in answers]
    by_rank0 = [r for r in results if "metrics_written_by" not in r]
    others = [r for r in results if "metrics_written_by" in r]
    assert len(by_rank0) == 1 and len(others) == 1, results
    assert others[0]["metrics"] is None
    assert by_rank0[0]["world_size"] == 2 and by_rank0[0]["steps"] > 0, by_rank0
    assert others[0]["ranks"] == [1] and others[0]["node_rank"] == 1, others
    assert others[0]["world_size"] == 2
    # the rank-0 node's answer is the file it wrote in this run
    written = [json.loads((n / "metrics" / "pretrain.json").read_text()) for n in nodes]
    assert by_rank0[0] in written and stale in written
