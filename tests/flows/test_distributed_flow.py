"""The flow a GPU work pool runs: it launches torchrun, so the Prefect run ends Completed."""

from __future__ import annotations

import json
import sys

import pytest
from mlflow import MlflowClient
from pilamim_flows.distributed import pretrain_distributed, torchrun_command

from pilamim.params_files import dump_params
from tests.conftest import micro_run_params
from tests.flows.support import clear_mlflow, tracked_env
from tests.servers._process import free_port


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
