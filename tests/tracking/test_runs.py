"""Stage runs, metric logging, lineage tags and fast failure against a real MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pilamim.config import Params
from pilamim.registry import store
from pilamim.stages import register as register_step
from pilamim.stages import runner, stage
from pilamim.tracking import datasets, runs, server
from tests.mlflow_store import free_port, write_metrics, write_prepared


def test_default_uri_is_the_sqlite_file_mlflow_ui_opens(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert server.resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert server.artifact_location(server.resolve_tracking_uri(), "pilamim") == (
        (tmp_path / "mlartifacts" / "pilamim").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert server.resolve_tracking_uri() == "http://tracking:5000"
    assert server.artifact_location("http://tracking:5000", "pilamim") is None


@pytest.mark.slow
def test_stages_started_together_on_a_fresh_folder_share_one_new_store(tmp_path, monkeypatch):
    """MLflow migrates a missing SQLite store on first use; unserialised, processes doing that
    at once all failed ("duplicate column name", alembic version errors)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    script = "from pilamim.tracking import server; print(server.connect()[1])"
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=fresh, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1  # one experiment, not two


def test_stage_run_records_params_tags_and_effective_params(tmp_path, params):
    with runs.stage_run("pretrain", params, groups=stage("pretrain").groups,
                        dataset_digest="abc123") as run:
        pass
    got = MlflowClient().get_run(run.run_id)
    assert got.info.run_name == "pretrain" and got.info.status == "FINISHED"
    assert got.data.params["pretrain.epochs"] == str(params.pretrain.epochs)
    assert got.data.params["pretrain.betas"] == "[0.9, 0.95]"
    assert got.data.params["pretrain.lr"] == "null"
    assert not any(k.startswith("probe.") for k in got.data.params)      # only its groups
    tags = got.data.tags
    assert tags["pilamim.params_hash"] == runs.params_hash(params, ["model", "pretrain"])
    assert tags["pilamim.git_commit"] and tags["pilamim.git_dirty"] in ("true", "false")
    assert tags["pilamim.data_digest"] == "abc123"
    assert tags["pilamim.pipeline_id"] == run.pipeline_id
    effective = yaml.safe_load(mlflow.artifacts.load_text(
        f"runs:/{run.run_id}/params/effective.yaml"))
    assert effective["pretrain"]["epochs"] == params.pretrain.epochs
    # Artifacts go beside the SQLite file, where `mlflow ui` run in that folder finds them.
    assert got.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def test_params_hash_is_canonical():
    a, b = Params(), Params()
    assert runs.params_hash(a) == runs.params_hash(b)
    b.probe.epochs = 30
    assert runs.params_hash(a) != runs.params_hash(b)
    assert runs.params_hash(a, ["data"]) == runs.params_hash(b, ["data"])


def test_failed_stage_marks_the_run_failed(params):
    with pytest.raises(RuntimeError, match="boom"):
        with runs.stage_run("probe", params) as run:
            raise RuntimeError("boom")
    assert MlflowClient().get_run(run.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_logger_records_step_metrics_by_the_end_of_the_run(params):
    """Sent in MLflow's background threads (tests/tracking/test_logger_outage.py: a frozen
    server does not slow log_metrics down); all there once the stage run ends."""
    with runs.stage_run("pretrain", params, log_system_metrics=False) as run:
        for step in range(25):
            run.logger.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1, "note": "x"}, step=step)
    history = MlflowClient().get_metric_history(run.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(25))
    assert max(history, key=lambda m: m.step).value == pytest.approx(1 / 25)
    assert "note" not in MlflowClient().get_run(run.run_id).data.metrics


def test_logger_artifacts_go_to_tidy_folders(tmp_path, params):
    figure, summary = tmp_path / "recon.png", tmp_path / "probe.json"
    figure.write_bytes(b"\x89PNG fake")
    summary.write_text("{}")
    with runs.stage_run("probe", params, log_system_metrics=False) as run:
        run.logger.log_artifact(figure)
        run.log_artifact(summary)
    client = MlflowClient()
    assert [a.path for a in client.list_artifacts(run.run_id, "figures")] == ["figures/recon.png"]
    assert [a.path for a in client.list_artifacts(run.run_id, "metrics")] == [
        "metrics/probe.json"]


def test_system_metrics_are_recorded(params):
    with runs.stage_run("pretrain", params) as run:
        time.sleep(1.5)
    metrics = MlflowClient().get_run(run.run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)


def test_stage_runs_started_one_by_one_share_a_lineage_pipeline_id(params, monkeypatch):
    """Separate processes (dvc repro) with the same code and params get one pipeline tag."""
    monkeypatch.delenv(runs.ENV_PIPELINE_ID, raising=False)
    monkeypatch.delenv(runs.ENV_PARENT_RUN_ID, raising=False)
    with runs.stage_run("prepare", params, log_system_metrics=False) as first:
        pass
    with runs.stage_run("probe", params, log_system_metrics=False) as second:
        pass
    assert first.pipeline_id == second.pipeline_id
    assert first.pipeline_id.startswith("lineage-")


def test_child_runs_link_to_the_pipeline_and_ignore_inherited_run_id(params, monkeypatch):
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "flow-run-42")
    with runs.pipeline_run(params, pipeline_id="pipe-1") as parent:
        assert os.environ["PILAMIM_PARENT_RUN_ID"] == parent.run_id
        # A stray MLFLOW_RUN_ID (e.g. inherited from a parent process) must not be resumed.
        monkeypatch.setenv("MLFLOW_RUN_ID", parent.run_id)
        with runs.stage_run("prepare", params, log_system_metrics=False) as child:
            assert child.run_id != parent.run_id
        assert os.environ["MLFLOW_RUN_ID"] == parent.run_id          # restored for others
        with runs.stage_run("probe", params, parent_run_id=parent.run_id,
                                log_system_metrics=False) as explicit:
            pass
    assert "PILAMIM_PARENT_RUN_ID" not in os.environ
    client = MlflowClient()
    for run_id in (child.run_id, explicit.run_id):
        tags = client.get_run(run_id).data.tags
        assert tags["mlflow.parentRunId"] == parent.run_id
        assert tags["pilamim.pipeline_id"] == "pipe-1"
        assert tags["pilamim.prefect_flow_run_id"] == "flow-run-42"
    got = client.get_run(parent.run_id)
    assert got.info.status == "FINISHED" and got.data.params["probe.epochs"]


def test_orchestrator_ids_come_in_as_extra_tags_and_win_over_the_env(params, monkeypatch):
    """Tracking does not ask Prefect: the flow passes its flow/task run ids as extra tags."""
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "from-a-worker")
    flow_id = {runs.TAG_PREFECT_FLOW_RUN: "flow-7"}
    with runs.pipeline_run(params, pipeline_id="pipe-7", extra_tags=flow_id) as parent:
        with runs.stage_run("probe", params, log_system_metrics=False, extra_tags={
                **flow_id, runs.TAG_PREFECT_TASK_RUN: "task-7"}) as child:
            pass
    client = MlflowClient()
    assert client.get_run(parent.run_id).data.tags[runs.TAG_PREFECT_FLOW_RUN] == "flow-7"
    tags = client.get_run(child.run_id).data.tags
    assert tags[runs.TAG_PREFECT_FLOW_RUN] == "flow-7"
    assert tags[runs.TAG_PREFECT_TASK_RUN] == "task-7"


def test_the_runner_puts_extra_tags_on_the_stage_run(params, monkeypatch):
    stage = SimpleNamespace(run=lambda p, logger: {"answer": 42})
    monkeypatch.setattr(runner, "stage_module", lambda name: stage)
    monkeypatch.setattr(runner, "check_inputs", lambda name, p: None)
    result = runner.execute("probe", params, extra_tags={runs.TAG_PREFECT_TASK_RUN: "t-1"})
    got = MlflowClient().get_run(result["mlflow_run_id"])
    assert got.data.tags[runs.TAG_PREFECT_TASK_RUN] == "t-1"
    assert got.data.metrics["probe/answer"] == 42


def test_register_refuses_to_run_untracked_before_anything_is_written(tmp_path, params,
                                                                     encoder_dir):
    """Registering a version is an MLflow write: ``track=False`` cannot be honoured. Its
    inputs are all there, so only the refusal keeps it from registering."""
    write_prepared(tmp_path / "data" / "prepared")
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.5, top5=0.9)
    write_metrics(tmp_path / "metrics" / "finetune.json", top1=0.6, top5=0.9)
    store = (tmp_path / "mlflow.db").read_bytes()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(runner.TrackingRequiredError,
                       match="register writes to the MLflow Model Registry; it cannot run "
                             "with --no-track"):
        runner.execute("register", params, track=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before    # no lock, no artifacts
    assert (tmp_path / "mlflow.db").read_bytes() == store
    runner.check_untracked_allowed("probe")                         # the others may


def test_separate_processes_share_the_pipeline_tag(params, monkeypatch):
    monkeypatch.setenv("PILAMIM_PIPELINE_ID", "dvc-repro-7")
    with runs.stage_run("prepare", params, log_system_metrics=False) as a:
        pass
    with runs.stage_run("pretrain", params, log_system_metrics=False) as b:
        pass
    found = MlflowClient().search_runs([a.experiment_id],
                                       "tags.`pilamim.pipeline_id` = 'dvc-repro-7'")
    assert {r.info.run_id for r in found} == {a.run_id, b.run_id}


def test_dataset_input_carries_the_prepared_digest(tmp_path, params):
    digest = write_prepared(tmp_path / "data" / "prepared")
    with runs.stage_run("pretrain", params, log_system_metrics=False) as run:
        assert datasets.log_dataset_input(tmp_path / "data" / "prepared") == digest
    got = MlflowClient().get_run(run.run_id)
    (inp,) = got.inputs.dataset_inputs
    assert inp.dataset.digest == digest[:36] and inp.dataset.name == "prepared"
    assert str(tmp_path / "data" / "raw") in inp.dataset.source
    assert {t.key: t.value for t in inp.tags}["pilamim.full_digest"] == digest
    assert got.data.tags["pilamim.data_digest"] == digest
    with pytest.raises(FileNotFoundError, match="run `pilamim prepare` first"):
        datasets.log_dataset_input(tmp_path / "missing")


def test_http_limits_are_scoped_and_respect_the_user(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    with server.http_limits(), server.http_limits():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


def test_unreachable_server_fails_fast_and_writes_nothing(tmp_path, params, encoder_dir,
                                                          monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    write_prepared(tmp_path / "data" / "prepared")
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.5)
    before = sorted(p.name for p in tmp_path.iterdir())
    start = time.monotonic()
    with pytest.raises(server.TrackingUnavailable, match=uri.replace(".", r"\.")):
        with runs.stage_run("pretrain", params):
            pytest.fail("the stage body must not run")
    with pytest.raises(server.TrackingUnavailable, match="MLFLOW_TRACKING_URI"):
        register_step.register(params)
    with pytest.raises(server.TrackingUnavailable):
        store.list_models()
    assert time.monotonic() - start < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == before     # no mlartifacts, no JSON
    assert not (tmp_path / "metrics" / "register.json").exists()
    assert mlflow.active_run() is None
