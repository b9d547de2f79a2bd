"""A tracking server that goes away mid-run costs no curve and does not hang the stage.

Real ``mlflow server`` processes on loopback (:mod:`tests.servers.mlflow_server`): one is
stopped and a new one started on the same port and store, as after a restart; one is frozen
with SIGSTOP, as a server that accepts connections but never answers.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import warnings

import pytest
from mlflow import MlflowClient

from pilamim.tracking.logger import MLFLOW_QUEUE_LOGGER, MLflowLogger
from tests.servers._process import free_port
from tests.servers.mlflow_server import mlflow_server


@pytest.fixture
def fast_failing_http(monkeypatch):
    """MLflow's HTTP client gives up at once (no retries, 3 s timeout): a dead server shows
    within the test's patience instead of after MLflow's minutes of retries."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")


def _new_run(tracking_uri: str) -> str:
    client = MlflowClient(tracking_uri)
    return client.create_run(client.create_experiment("outage")).info.run_id


def _failure_records(caplog, run_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "pilamim.tracking.logger" and run_id in r.getMessage()
            and "failed" in r.getMessage()]


class _Records(logging.Handler):
    """Keeps the records of one logger: MLflow's loggers do not propagate to caplog's."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _wait_for(condition, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_metrics_logged_during_and_after_an_outage_reach_the_run(tmp_path, caplog,
                                                                  fast_failing_http):
    store = tmp_path / "store"
    caplog.set_level(logging.INFO)
    with mlflow_server(store) as first:
        run_id = _new_run(first.tracking_uri)
        logger = MLflowLogger(run_id, MlflowClient(first.tracking_uri), retry_every_s=0.0)
        for step in (1, 2, 3):
            logger.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
        assert logger.flush(timeout_s=30)
    # The server is gone: training goes on, one warning names the run and the error.
    mlflow_lines = _Records()
    logging.getLogger(MLFLOW_QUEUE_LOGGER).addHandler(mlflow_lines)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(4, 9):
                logger.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
                _wait_for(lambda: _failure_records(caplog, run_id))
                time.sleep(0.2)  # let this step's probe fail too
    finally:
        logging.getLogger(MLFLOW_QUEUE_LOGGER).removeHandler(mlflow_lines)
    failures = _failure_records(caplog, run_id)
    assert len(failures) == 1, [r.getMessage() for r in failures]
    assert "Connection refused" in failures[0].getMessage(), failures[0].getMessage()
    assert [str(w.message) for w in caught if run_id in str(w.message)] == \
        [failures[0].getMessage()]
    # MLflow's own ERROR line per failed batch is folded into that one warning
    assert not [r.getMessage() for r in mlflow_lines.records if run_id in r.getMessage()]
    # The server is back (restarted on the same port and store): later metrics go through,
    # and the ones held during the outage with them.
    with mlflow_server(store, port=first.port) as again:
        for step in range(9, 12):
            logger.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
        logger.close()
        history = MlflowClient(again.tracking_uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 12))
    assert any("resumed" in r.getMessage() and run_id in r.getMessage()
               for r in caplog.records), "no line said that logging resumed"


@pytest.mark.slow
def test_close_gives_up_in_bounded_time_when_the_server_does_not_answer(tmp_path, monkeypatch,
                                                                         fast_failing_http):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")  # the request hangs, close() not
    with mlflow_server(tmp_path / "store") as server:
        run_id = _new_run(server.tracking_uri)
        logger = MLflowLogger(run_id, MlflowClient(server.tracking_uri), close_timeout_s=1.0)
        os.killpg(server.pid, signal.SIGSTOP)  # accepts connections, answers nothing
        try:
            started = time.monotonic()
            logger.log_metrics({"loss": 1.0}, 1)  # returns at once: MLflow's threads send it
            assert time.monotonic() - started < 1
            with pytest.warns(RuntimeWarning, match=f"1 metric values of MLflow run {run_id} "
                                                    "were not recorded"):
                logger.close()
            assert time.monotonic() - started < 5
        finally:
            os.killpg(server.pid, signal.SIGCONT)


def test_metrics_reach_a_local_store_by_close(mlflow_store):
    client = MlflowClient(mlflow_store)
    run_id = _new_run(mlflow_store)
    logger = MLflowLogger(run_id, client)
    for step in range(1, 31):
        logger.log_metrics({"loss": 1.0 / step, "note": "not a number"}, step)
    logger.close()
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == \
        list(range(1, 31))
    assert "note" not in client.get_run(run_id).data.metrics


def test_a_batch_the_store_refuses_is_dropped_with_one_warning_not_retried(mlflow_store, caplog):
    client = MlflowClient(mlflow_store)
    run_id = _new_run(mlflow_store)
    client.delete_run(run_id)  # the store answers every batch with INVALID_PARAMETER_VALUE
    logger = MLflowLogger(run_id, client, close_timeout_s=10.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 6):
            logger.log_metrics({"loss": 1.0}, step)
        logger.close()
    messages = [str(w.message) for w in caught]
    assert len([m for m in messages if "rejected" in m]) == 1, messages
    assert any(f"5 metric values of MLflow run {run_id} were not recorded" in m
               for m in messages), messages


def test_while_nothing_answers_metrics_are_held_up_to_a_cap_and_close_counts_them(
        fast_failing_http):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there: every request is refused
    run_id = "0" * 32
    logger = MLflowLogger(run_id, MlflowClient(uri), max_held=10, retry_every_s=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 21):
            logger.log_metrics({"loss": 1.0, "lr": 0.1}, step)
            time.sleep(0.02)
        started = time.monotonic()
        logger.close()
        assert time.monotonic() - started < 10
    messages = [str(w.message) for w in caught]
    assert len([m for m in messages if "failed (ConnectionRefusedError" in m]) == 1, messages
    # 20 steps x 2 values: 10 held (the cap) and 30 dropped, none recorded
    assert any(m.startswith(f"40 metric values of MLflow run {run_id} were not recorded "
                            "(ConnectionRefusedError") for m in messages), messages
