"""Real servers for the integration suite, each started once per test session on 127.0.0.1.

The production topology in miniature: SeaweedFS (S3), PostgreSQL, an MLflow server that
keeps runs in PostgreSQL and artifacts in S3, a Prefect server and a process work pool
worker. Servers start when the first integration test asks for any of them (all at once, in
the background) and stop by PID at session end.

The public fixtures refuse to serve tests that are not marked ``@pytest.mark.integration``,
so a unit test cannot boot servers by accident and ``-m "not integration"`` skips them all.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.servers.mlflow_server import MlflowServer, mlflow_server
from tests.servers.postgres import PostgresServer, postgres_server
from tests.servers.prefect_server import (
    PrefectServer,
    PrefectWorker,
    prefect_server,
    prefect_worker,
)
from tests.servers.seaweedfs import S3Server

MLFLOW_BUCKET = "pilamim-mlflow"
DATA_BUCKET = "pilamim-data"
WORK_POOL = "pilamim-integration"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "integration: runs against real servers (PostgreSQL, SeaweedFS S3, MLflow, Prefect) "
        "started on 127.0.0.1 by tests/integration/conftest.py",
    )


SERVER_FIXTURES = frozenset(
    {"s3_server", "postgres", "mlflow_tracking_server", "prefect_api", "prefect_process_worker"}
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse (before anything starts) tests that use a server fixture without the marker."""
    here = Path(__file__).parent  # other folders have their own fixtures of the same names
    unmarked = [
        item.nodeid
        for item in items
        if item.path.is_relative_to(here)
        and SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("integration") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "these tests use real-server fixtures but are not marked @pytest.mark.integration: "
            + ", ".join(unmarked)
        )


# -- session-scoped servers (private: use the marker-checked fixtures below) ---------------


class _Topology:
    """Starts the servers in two background threads (PostgreSQL -> MLflow, and Prefect) as
    soon as the first integration fixture asks, because most of each server's start-up is
    importing Python and migrating a database: two at once nearly halve the wait. S3 is the
    session's SeaweedFS (tests/conftest.py), shared with the data and DVC suites. Everything
    entered here is stopped in reverse order at session end."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, s3: S3Server) -> None:
        self._s3 = s3  # the session's S3 server (tests/conftest.py), shared with other suites
        self._dirs = {name: tmp_path_factory.mktemp(name)
                      for name in ("postgres", "mlflow", "prefect")}
        self._stack = ExitStack()
        self._lock = threading.Lock()
        self._threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="server-start")
        self._mlflow_chain = self._threads.submit(self._start_mlflow_chain)
        self._prefect = self._threads.submit(
            self._enter, prefect_server(self._dirs["prefect"]))

    def _enter(self, manager):
        # A context manager entered in a worker thread; exited by close() in the main thread.
        value = manager.__enter__()
        with self._lock:
            self._stack.push(manager.__exit__)
        return value

    def _start_mlflow_chain(self) -> tuple[S3Server, PostgresServer, MlflowServer]:
        s3 = self._s3
        client = s3.client()
        for bucket in (MLFLOW_BUCKET, DATA_BUCKET):
            client.create_bucket(Bucket=bucket)
        pg = self._enter(postgres_server(self._dirs["postgres"], database="mlflow"))
        ml = self._enter(mlflow_server(
            self._dirs["mlflow"], backend_store_uri=pg.url,
            artifacts_destination=f"s3://{MLFLOW_BUCKET}/artifacts", s3_env=s3.env()))
        return s3, pg, ml

    @property
    def s3(self) -> S3Server:
        return self._mlflow_chain.result()[0]

    @property
    def postgres(self) -> PostgresServer:
        return self._mlflow_chain.result()[1]

    @property
    def mlflow(self) -> MlflowServer:
        return self._mlflow_chain.result()[2]

    @property
    def prefect(self) -> PrefectServer:
        return self._prefect.result()

    def close(self) -> None:
        # Let start-ups in flight finish (or fail) so that what they started is stopped too.
        self._threads.shutdown(wait=True)
        self._stack.close()


@pytest.fixture(scope="session")
def _topology(tmp_path_factory: pytest.TempPathFactory,
              seaweedfs: S3Server) -> Iterator[_Topology]:
    topology = _Topology(tmp_path_factory, seaweedfs)
    try:
        yield topology
    finally:
        topology.close()


@pytest.fixture(scope="session")
def _worker_session(
    tmp_path_factory: pytest.TempPathFactory, _topology: _Topology
) -> Iterator[PrefectWorker]:
    # Flow runs inherit the worker's environment: the tracking URI (no S3 credentials are
    # needed for MLflow) plus S3 access for data and DVC.
    env = {**_topology.s3.env(), **_topology.mlflow.env()}
    with prefect_worker(
        _topology.prefect, WORK_POOL, tmp_path_factory.mktemp("prefect-worker"), env=env
    ) as worker:
        yield worker


# -- public fixtures ------------------------------------------------------------------------


@pytest.fixture
def s3_server(_topology: _Topology) -> S3Server:
    """SeaweedFS S3 with buckets ``pilamim-mlflow`` (MLflow artifacts) and ``pilamim-data``."""
    return _topology.s3


@pytest.fixture
def postgres(_topology: _Topology) -> PostgresServer:
    """PostgreSQL holding the MLflow backend store (database ``mlflow``)."""
    return _topology.postgres


@pytest.fixture
def mlflow_tracking_server(_topology: _Topology) -> MlflowServer:
    """MLflow server: runs and registry in PostgreSQL, artifacts proxied to S3."""
    return _topology.mlflow


@pytest.fixture
def prefect_api(_topology: _Topology) -> PrefectServer:
    """Prefect server (SQLite in its own PREFECT_HOME)."""
    return _topology.prefect


@pytest.fixture
def prefect_process_worker(_worker_session: PrefectWorker) -> PrefectWorker:
    """A worker polling the ``process`` work pool ``pilamim-integration`` on the Prefect server;
    its flow runs see MLFLOW_TRACKING_URI and the S3 settings."""
    return _worker_session
