"""The flow's parts without a Prefect server: retries, params sync, parameter schema, and a stage
command run and reported outside a DVC repo (the other branch of :func:`reproduce`)."""

from __future__ import annotations

import json
import subprocess

import pytest
from dvc.exceptions import ReproductionError
from dvc.lock import LockError
from dvc.stage.exceptions import StageCmdFailedError
from mlflow.tracking import MlflowClient
from pilamim_flows.pipeline import (
    FLOW_NAME,
    STAGE_TASKS,
    StageFailed,
    pilamim_pipeline,
    read_metrics,
    read_report,
    reproduce,
    retry_transient,
    stage_env,
    stage_failure,
    sync_params,
)
from prefect.exceptions import ParameterTypeError
from prefect.states import Completed, Failed

from pilamim.checkout_lock import EXIT_BUSY
from pilamim.cli import EXIT_TRANSIENT
from pilamim.config import Params, ParamsError
from pilamim.params_files import dump_params, load_params
from pilamim.stages import STAGES
from pilamim.tracking import runs
from tests.flows.support import EXPERIMENT, clear_mlflow, tiny_params, tracked_env


def _raised_from(err: Exception, cause: BaseException) -> Exception:
    err.__cause__ = cause
    return err


@pytest.mark.parametrize("code", [1, 2, EXIT_BUSY, None])
def test_only_the_transient_exit_code_is_retried(code):
    assert retry_transient(None, None, Failed(data=StageFailed("probe", EXIT_TRANSIENT, "x")))
    assert not retry_transient(None, None, Failed(data=StageFailed("probe", code, "x")))
    assert not retry_transient(None, None, Failed(data=RuntimeError("not a stage command")))
    assert not retry_transient(None, None, Completed(data={}))


def test_every_stage_task_retries_only_through_the_condition():
    assert set(STAGE_TASKS) == set(STAGES)
    for name, t in STAGE_TASKS.items():
        assert t.name == name
        assert t.retries == 2 and t.retry_condition_fn is retry_transient
        assert t.persist_result is True


def test_the_command_s_report_decides_the_failure_else_dvc_s_error():
    reported = {"exit_code": EXIT_TRANSIENT, "error": "error: MLflow at http://x is unreachable"}
    failed = stage_failure("probe", reported, ReproductionError("failed to reproduce 'probe'"))
    assert failed.returncode == EXIT_TRANSIENT
    assert str(failed) == ("pilamim probe: error: MLflow at http://x is unreachable "
                           "(exit code 69)")
    # another dvc process held the repo lock: DVC raised before the command ran
    locked = _raised_from(ReproductionError("failed to reproduce 'probe'"),
                          LockError("Unable to acquire lock"))
    assert stage_failure("probe", {}, locked).returncode == EXIT_TRANSIENT
    # killed, or a crash before the command could report: DVC keeps the status in its text only
    crashed = _raised_from(ReproductionError("failed to reproduce 'probe'"),
                           StageCmdFailedError("pilamim probe", -9))
    assert stage_failure("probe", {}, crashed).returncode is None
    assert stage_failure("probe", {"exit_code": 0}, crashed).returncode is None
    called = subprocess.CalledProcessError(-9, ["pilamim", "probe"])
    assert stage_failure("probe", {}, called).returncode == -9


def test_params_given_to_the_flow_are_written_where_dvc_reads_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params_dir = tmp_path / "params"
    params = Params()
    params.probe.epochs = 20
    assert sync_params(params, params_dir) is params          # no files yet: written
    assert load_params(params_dir) == params
    stamp = {p.name: p.stat().st_mtime_ns for p in params_dir.iterdir()}
    sync_params(load_params(params_dir), params_dir)          # equal: files untouched
    assert stamp == {p.name: p.stat().st_mtime_ns for p in params_dir.iterdir()}
    assert sync_params(None, params_dir) == params             # None: read the files


def test_params_none_reads_the_files_and_reports_a_typo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dump_params(Params(), tmp_path / "params")
    (tmp_path / "params" / "probe.yaml").write_text("epoch: 3\n")
    with pytest.raises(ParamsError, match="epoch"):
        sync_params(None, tmp_path / "params")


def test_in_a_dvc_repo_the_params_are_the_ones_dvc_yaml_names(tmp_path, monkeypatch):
    """dvc.yaml's commands read params/: params elsewhere would run one set and record another."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(ValueError, match="the stages read params/"):
        sync_params(Params(), "other-params")
    assert not (tmp_path / "other-params").exists()
    assert sync_params(Params(), "./params/") == Params()


def test_skipped_stage_reports_its_metrics_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = Params()
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "probe.json").write_text('{"top1": 0.5, "per_class": [1, 2]}')
    assert read_metrics("probe", params) == {"top1": 0.5}
    assert read_metrics("finetune", params) == {}             # missing file
    assert read_metrics("fetch", params) == {}                # no metrics file at all


def test_flow_parameters_are_the_pydantic_params_model():
    """The deployment's parameter schema is Params', so the Prefect UI validates edits."""
    assert pilamim_pipeline.name == FLOW_NAME
    schema = pilamim_pipeline.parameters.model_dump()
    assert set(schema["properties"]) == {"params", "params_dir", "force"}
    definitions = schema.get("definitions") or schema.get("$defs")
    assert {"Params", "ProbeParams", "PretrainParams"} <= set(definitions)
    assert definitions["ProbeParams"]["properties"]["epochs"]["minimum"] == 1
    ok = pilamim_pipeline.validate_parameters({"params": {"probe": {"epochs": 30}}})
    assert isinstance(ok["params"], Params) and ok["params"].probe.epochs == 30
    for bad in ({"probe": {"epochs": 0}}, {"probe": {"epoch": 3}}):
        with pytest.raises(ParameterTypeError):
            pilamim_pipeline.validate_parameters({"params": bad})


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """cwd = an empty folder (not a DVC repo), tiny params in it; private MLflow store."""
    tracked_env(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    dump_params(tiny_params(), tmp_path / "params")
    yield tmp_path
    clear_mlflow()


def test_outside_dvc_a_stage_command_runs_and_reports_its_tagged_run(workdir, monkeypatch,
                                                                     capfd):
    """The stage command reports to the file the task names, not to stdout, and tags its
    MLflow run with what the task hands down in PILAMIM_RUN_TAGS."""
    env = stage_env(workdir / "report.json")
    assert json.loads(env[runs.ENV_RUN_TAGS]) == {}            # no Prefect run here
    env[runs.ENV_RUN_TAGS] = json.dumps({runs.TAG_PREFECT_TASK_RUN: "task-7"})
    assert reproduce("fetch", "params", False, env) is True
    assert capfd.readouterr().out == ""
    report = read_report(workdir / "report.json")
    assert report["exit_code"] == 0 and report["result"]["mlflow_run_id"]
    run = MlflowClient().get_run(report["result"]["mlflow_run_id"])
    assert run.info.run_name == "fetch" and run.info.status == "FINISHED"
    assert run.data.tags[runs.TAG_PREFECT_TASK_RUN] == "task-7"
    assert MlflowClient().get_experiment(run.info.experiment_id).name == EXPERIMENT


def test_outside_dvc_a_failed_stage_command_reports_code_and_message(workdir):
    report_file = workdir / "report.json"
    with pytest.raises(subprocess.CalledProcessError) as info:
        reproduce("probe", "params", False, stage_env(report_file))
    failed = stage_failure("probe", read_report(report_file), info.value)
    assert failed.returncode == 1
    assert "run `pilamim prepare` first" in str(failed) and str(failed).endswith("(exit code 1)")
    assert not retry_transient(None, None, Failed(data=failed))
