"""The flow's policies without running stages: retries, params sync, parameter schema."""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace

import pytest
from botocore.exceptions import EndpointConnectionError, NoCredentialsError
from dvc.lock import LockError
from mlflow.exceptions import MlflowException
from pilamim_flows.isolation import execute_isolated
from pilamim_flows.pipeline import (
    FLOW_NAME,
    STAGE_TASKS,
    pilamim_pipeline,
    read_metrics,
    stage_cache_key,
    sync_params,
)
from pilamim_flows.retry import is_transient, retry_transient
from prefect.exceptions import ParameterTypeError
from prefect.states import Completed, Failed

from pilamim.config import Params, ParamsError
from pilamim.data.errors import DataError
from pilamim.params_files import dump_params, load_params
from pilamim.stages import STAGES
from pilamim.stages.runner import MissingInputError
from pilamim.tracking.server import TrackingUnavailable


def _caused(err: BaseException, cause: BaseException) -> BaseException:
    err.__cause__ = cause
    return err


@pytest.mark.parametrize("err", [
    TrackingUnavailable("MLflow tracking server http://x is unreachable"),
    ConnectionRefusedError("refused"),
    TimeoutError("read timed out"),
    EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
    MlflowException("(sqlite3.OperationalError) database is locked"),
    sqlite3.OperationalError("database is locked"),
    # the data package wraps botocore's connection errors: the cause decides
    _caused(DataError("cannot reach S3 endpoint"), EndpointConnectionError(endpoint_url="x")),
    MlflowException("API request to http://x failed: Max retries exceeded with url"),
    LockError("Unable to acquire lock. Most likely another DVC process is running"),
])
def test_transient_failures_are_retried(err):
    assert is_transient(err)
    assert retry_transient(None, None, Failed(data=err))


@pytest.mark.parametrize("err", [
    ParamsError("params/probe.yaml: unknown key 'epoch'"),
    MissingInputError("`pilamim probe` needs models/pretrain/encoder.json: run pretrain first"),
    ValueError("unknown stage"),
    DataError("data.source '/nope': /nope does not exist"),
    _caused(DataError("no credentials"), NoCredentialsError()),
    RuntimeError("pretraining loss became nan"),
    MlflowException("RESOURCE_DOES_NOT_EXIST: registered model not found"),
    # bad params stay bad even when raised while handling a network error
    _caused(ParamsError("bad"), ConnectionError("refused")),
])
def test_permanent_failures_fail_at_once(err):
    assert not is_transient(err)
    assert not retry_transient(None, None, Failed(data=err))


def test_every_stage_task_retries_only_through_the_condition():
    assert set(STAGE_TASKS) == set(STAGES)
    for name, t in STAGE_TASKS.items():
        assert t.name == name
        assert t.retries == 2 and t.retry_condition_fn is retry_transient
        assert t.persist_result is True
    assert not retry_transient(None, None, Completed(data={}))


def test_params_given_to_the_flow_are_written_where_dvc_reads_them(tmp_path):
    params_dir = tmp_path / "params"
    params = Params()
    params.probe.epochs = 20
    assert sync_params(params, params_dir) is params          # no files yet: written
    assert load_params(params_dir) == params
    stamp = {p.name: p.stat().st_mtime_ns for p in params_dir.iterdir()}
    sync_params(load_params(params_dir), params_dir)          # equal: files untouched
    assert stamp == {p.name: p.stat().st_mtime_ns for p in params_dir.iterdir()}
    assert sync_params(None, params_dir) == params             # None: read the files


def test_params_none_reads_the_files_and_reports_a_typo(tmp_path):
    dump_params(Params(), tmp_path / "params")
    (tmp_path / "params" / "probe.yaml").write_text("epoch: 3\n")
    with pytest.raises(ParamsError, match="epoch"):
        sync_params(None, tmp_path / "params")


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


def test_result_key_is_stage_params_content_and_flow_run():
    """Content keys: a change in the stage's own params or another flow run gives a new key;
    a change in another stage's params does not."""
    def key(params, stage="probe", flow_run="run-1", force=False):
        ctx = SimpleNamespace(task_run=SimpleNamespace(flow_run_id=flow_run, id="task-1"))
        return stage_cache_key(ctx, {"stage": stage, "params": params, "force": force})

    base, other = Params(), Params()
    assert key(base) == key(other)
    other.finetune.epochs = 50                                 # not a probe param
    assert key(base) == key(other)
    other.probe.epochs = 20
    assert key(base) != key(other)
    assert key(base) != key(base, flow_run="run-2")
    assert key(base) != key(base, stage="finetune")
    assert key(base) != key(base, force=True)


def test_an_isolated_stage_sends_its_error_back_as_itself(tmp_path, monkeypatch):
    """probe/finetune run in their own process: errors cross back with type and message."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingInputError, match="run `pilamim prepare` first") as info:
        execute_isolated("probe", Params(), threads=1)
    assert not is_transient(info.value)
