"""The whole flow in a temporary git + DVC repo: real stages, real Prefect, MLflow, DVC.

One repository serves the module; the tests run in file order and each starts from what the
previous flow run left (as a user would run the flow again): a first run does everything, a
second one skips everything, a probe param change reruns probe and register only. The stage
commands run as DVC starts them (``dvc repro``'s way), so every branch of a task in a DVC repo
runs here: ran, skipped; a failed stage is in ``test_flow_failures.py``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pilamim_flows.pipeline import ARTIFACT_KEY, pilamim_pipeline
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)

from pilamim.params_files import load_params
from pilamim.stages import STAGES, waves
from pilamim.stages.lineage import eval_protocol
from tests.flows.support import clear_mlflow, dvc, make_dvc_repo, tiny_params, tracked_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(prefect_harness, tmp_path_factory):
    """cwd = a fresh git + DVC repo with tiny params; MLflow store inside it."""
    root = make_dvc_repo(tmp_path_factory.mktemp("flow-repo"), tiny_params())
    with pytest.MonkeyPatch.context() as mp:
        tracked_env(mp, root)
        mp.chdir(root)
        yield root
        clear_mlflow()


def run_flow(**kwargs):
    """Run the flow; return (summary, flow run id, {task name: task run})."""
    state = pilamim_pipeline(return_state=True, **kwargs)
    assert state.is_completed(), state.message
    summary = state.result()
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return summary, flow_run_id, {tr.name: tr for tr in task_runs}


@pytest.fixture(scope="module")
def first(repo):
    return run_flow()


def test_first_run_completes_every_stage(repo, first):
    summary, _, task_runs = first
    assert summary["status"] == "completed"
    assert summary["ran"] == list(STAGES) and summary["skipped"] == []
    assert set(task_runs) == set(STAGES)
    for name, tr in task_runs.items():
        assert tr.state.is_completed(), (name, tr.state)
        assert tr.run_count == 1
        # results are persisted (persist_result=True): the API state reads them back
        assert tr.state.result()["stage"] == name
    for path in ("data/prepared/manifest.csv", "models/pretrain/encoder.safetensors",
                 "metrics/pretrain.json", "metrics/probe.json", "metrics/finetune.json",
                 "metrics/register.json", "dvc.lock"):
        assert (repo / path).exists(), path
    assert 0.0 <= summary["metrics"]["probe_top1"] <= summary["metrics"]["probe_top5"] <= 1.0
    assert "finetune_top1" in summary["metrics"] and "knn_top1" in summary["metrics"]


def test_stages_run_in_turn_in_the_stage_table_order(first):
    """One stage at a time (DVC holds its repo lock per reproduce): each task starts after the
    one before it ended, in the order of the stage table's waves."""
    _, _, task_runs = first
    order = [s for wave in waves() for s in wave]
    assert sorted(task_runs, key=lambda n: task_runs[n].start_time) == order
    for before, after in itertools.pairwise(order):
        assert task_runs[after].start_time >= task_runs[before].end_time, (before, after)


def test_first_version_is_registered_as_champion(repo, first):
    summary, _, _ = first
    record = json.loads((repo / "metrics/register.json").read_text())
    assert summary["decision"] == record["action"] == "champion"
    assert summary["decision_reason"] == record["reason"]
    client = MlflowClient()
    name = load_params("params").register.model_name
    champion = client.get_model_version_by_alias(name, "champion")
    assert int(champion.version) == record["version"] == summary["model_version"]


def test_stage_runs_are_children_of_the_pipeline_run(first):
    summary, flow_run_id, task_runs = first
    client = MlflowClient()
    parent = client.get_run(summary["pipeline_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["pilamim.prefect_flow_run_id"] == str(flow_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == set(STAGES)
    for stage, run in by_name.items():
        assert run.info.status == "FINISHED", stage
        assert run.info.run_id == summary["mlflow_runs"][stage]
        assert run.data.tags["pilamim.pipeline_id"] == summary["pipeline_id"]
        assert run.data.tags["pilamim.prefect_flow_run_id"] == str(flow_run_id), stage
        assert run.data.tags["pilamim.prefect_task_run_id"] == str(task_runs[stage].id), stage


def test_summary_artifact_has_metrics_decision_and_stages(first):
    summary, flow_run_id, _ = first
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[ARTIFACT_KEY]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert len(artifacts) == 1 and artifacts[0].type == "markdown"
    text = artifacts[0].data
    for needle in ("linear probe top-1", "fine-tune top-5", "kNN top-1", "pretrain loss",
                   "@champion", summary["decision_reason"], summary["pipeline_run_id"],
                   "| register | ran |"):
        assert needle in text, needle


def test_second_run_skips_every_stage_and_dvc_is_clean(repo, first):
    before = (repo / "dvc.lock").read_text()
    summary, _, task_runs = run_flow()
    assert summary["ran"] == [] and summary["skipped"] == list(STAGES)
    assert all(tr.state.is_completed() for tr in task_runs.values())
    assert summary["decision"] == "champion"           # the recorded decision, re-read
    assert summary["metrics"]["probe_top1"] == first[0]["metrics"]["probe_top1"]
    assert (repo / "dvc.lock").read_text() == before
    assert "up to date" in dvc(repo, "status")


def test_probe_param_change_reruns_probe_and_register_only(repo, first):
    params = load_params("params")
    params.probe.epochs = params.probe.epochs - 1
    summary, _, _ = run_flow(params=params)
    assert summary["ran"] == ["probe", "register"]
    assert summary["skipped"] == ["fetch", "prepare", "pretrain", "finetune"]
    # the flow wrote the changed params where DVC reads them, so DVC agrees it is all done
    assert load_params("params").probe.epochs == params.probe.epochs
    assert "up to date" in dvc(repo, "status")
    # same weights, same version: its metrics are now the ones the changed probe measured
    record = json.loads(Path("metrics/register.json").read_text())
    assert record["version"] == 1 and record["reused"] is True
    tags = MlflowClient().get_model_version(params.register.model_name, "1").tags
    assert tags["eval_protocol"] == record["eval_protocol"] == eval_protocol("probe",
                                                                              params.probe)
    assert float(tags["metric.probe_top1"]) == pytest.approx(record["metrics"]["probe_top1"],
                                                             rel=1e-5)
