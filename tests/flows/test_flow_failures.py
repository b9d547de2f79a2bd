"""Failures through the real flow and Prefect: a user error fails fast, once, with the message
that says why; a transient one (the tracking server down) is retried."""

from __future__ import annotations

import socket
import time

import pytest
from mlflow.tracking import MlflowClient
from pilamim_flows.pipeline import ARTIFACT_KEY, RETRIES, STAGE_TASKS, pilamim_pipeline
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)

from pilamim.config import ParamsError
from pilamim.params_files import dump_params, load_params
from tests.flows.support import EXPERIMENT, clear_mlflow, tiny_params, tracked_env


@pytest.fixture
def workdir(prefect_harness, tmp_path, monkeypatch):
    """cwd = an empty folder (not a DVC repo: every stage runs); private MLflow store."""
    tracked_env(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    clear_mlflow()


def _task_runs(state):
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return {tr.name: tr for tr in runs}


def test_a_stage_error_a_user_can_fix_is_not_retried(workdir):
    params = tiny_params()
    params.data.source = str(workdir / "no-such-images")
    start = time.perf_counter()
    state = pilamim_pipeline(params=params, return_state=True)
    elapsed = time.perf_counter() - start
    assert state.is_failed()
    runs = _task_runs(state)
    assert set(runs) == {"fetch"}                      # nothing downstream started
    assert runs["fetch"].state.is_failed() and runs["fetch"].run_count == 1
    assert "does not exist" in runs["fetch"].state.message
    assert elapsed < 60, elapsed                       # no 10 s / 60 s retry waits
    # the pipeline's MLflow run is closed as FAILED; the summary artifact says why
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    [pipeline] = client.search_runs([exp.experiment_id], "tags.`pilamim.stage` = 'pipeline'")
    assert pipeline.info.status == "FAILED"
    with get_client(sync_client=True) as prefect:
        [artifact] = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[ARTIFACT_KEY]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert "# PiLaMIM pipeline: failed" in artifact.data and "does not exist" in artifact.data
    assert "| prepare | not run |" in artifact.data


def test_a_params_file_with_a_typo_fails_before_any_stage(workdir):
    dump_params(tiny_params(), workdir / "params")
    (workdir / "params" / "probe.yaml").write_text("epoch: 3\n")
    state = pilamim_pipeline(return_state=True)
    assert state.is_failed()
    with pytest.raises(ParamsError, match="epoch"):
        state.result()
    assert _task_runs(state) == {}
    assert not (workdir / "mlflow.db").exists()        # nothing recorded, nothing half-written


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@flow
def _fetch_only(params_dir: str) -> None:
    """The flow's fetch task, without waiting between retries."""
    task = STAGE_TASKS["fetch"].with_options(retry_delay_seconds=0)
    task("fetch", load_params(params_dir), params_dir, False)


def test_a_stage_that_finds_the_tracking_server_down_is_retried(workdir, monkeypatch):
    """The stage command exits with the transient code (the tracking server does not answer):
    Prefect retries the task, each try a new command, then reports the outage."""
    dump_params(tiny_params(), workdir / "params")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    state = _fetch_only("params", return_state=True)
    assert state.is_failed()
    fetch = _task_runs(state)["fetch"]
    assert fetch.run_count == RETRIES + 1, fetch.state.message
    assert "(exit code 69)" in fetch.state.message and "unreachable" in fetch.state.message
    assert not (workdir / "data" / "raw").exists()     # refused before fetching anything
