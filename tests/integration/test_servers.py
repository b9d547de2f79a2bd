"""Smoke tests of the integration topology itself: each server works for real, and fails for
real where it should (wrong S3 credentials, a tracking server that is not there).

The pipeline's own integration tests build on the same fixtures (tests/integration/conftest.py).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import MLFLOW_BUCKET
from tests.servers._process import free_port, http_ok

pytestmark = pytest.mark.integration


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def no_s3_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A client environment with no S3 settings or credentials of any kind."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name == "MLFLOW_S3_ENDPOINT_URL":
            monkeypatch.delenv(name)
    # No ~/.aws files either: point boto3 at files that do not exist.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def tracking_env(monkeypatch: pytest.MonkeyPatch, mlflow_tracking_server, no_s3_credentials):
    """MLFLOW_TRACKING_URI pointing at the server, for this test only."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_tracking_server.tracking_uri)
    assert mlflow.get_tracking_uri() == mlflow_tracking_server.tracking_uri, (
        "something called mlflow.set_tracking_uri() globally; it overrides MLFLOW_TRACKING_URI"
    )
    return mlflow_tracking_server


# -- MLflow on PostgreSQL + S3 --------------------------------------------------------------


def test_mlflow_run_artifacts_go_to_s3_through_the_server(tracking_env, s3_server, tmp_path):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    assert "AWS_ACCESS_KEY_ID" not in os.environ
    client = MlflowClient(tracking_uri=tracking_env.tracking_uri)
    experiment_id = client.create_experiment(_unique("smoke"))
    run = client.create_run(experiment_id, run_name="artifact-round-trip")
    run_id = run.info.run_id
    client.log_param(run_id, "lr", "0.001")
    client.log_metric(run_id, "loss", 0.5, step=1)
    note = tmp_path / "note.txt"
    note.write_text("pixels and latents\n")
    client.log_artifact(run_id, str(note), artifact_path="notes")
    client.set_terminated(run_id)

    stored = client.get_run(run_id)
    assert stored.data.params == {"lr": "0.001"}
    assert stored.data.metrics["loss"] == 0.5
    assert stored.info.status == "FINISHED"
    # Proxied artifacts: the client sees the server's scheme, never s3://.
    assert stored.info.artifact_uri.startswith("mlflow-artifacts:")

    local = download_artifacts(run_id=run_id, artifact_path="notes/note.txt",
                               dst_path=str(tmp_path / "back"),
                               tracking_uri=tracking_env.tracking_uri)
    assert Path(local).read_text() == "pixels and latents\n"

    # ... and the bytes really are in the S3 bucket (read with the admin identity).
    keys = [obj["Key"] for obj in s3_server.client().list_objects_v2(
        Bucket=MLFLOW_BUCKET, Prefix="artifacts/").get("Contents", [])]
    assert any(key.endswith(f"{run_id}/artifacts/notes/note.txt") for key in keys), keys


def test_runs_are_stored_in_postgresql(tracking_env, postgres):
    import sqlalchemy as sa
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_env.tracking_uri)
    name = _unique("pg")
    experiment_id = client.create_experiment(name)
    engine = sa.create_engine(postgres.url)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                sa.text("SELECT experiment_id FROM experiments WHERE name = :name"),
                {"name": name},
            ).scalar_one()
    finally:
        engine.dispose()
    assert str(found) == experiment_id


def _doubler_model():
    """A trivial pyfunc model that doubles a list of numbers (type hints give it a signature)."""
    import mlflow.pyfunc

    class Doubler(mlflow.pyfunc.PythonModel):
        def predict(self, model_input: list[float], params=None) -> list[float]:
            return [2 * x for x in model_input]

    return Doubler()


def test_registered_model_alias_round_trip(tracking_env, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    name = _unique("smoke-model")
    client = MlflowClient(tracking_uri=tracking_env.tracking_uri)
    experiment_id = client.create_experiment(_unique("registry"))
    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=_doubler_model(), pip_requirements=[],
            registered_model_name=name,
        )
    version = info.registered_model_version
    client.set_registered_model_alias(name, "champion", version)

    assert client.get_model_version_by_alias(name, "champion").version == str(version)
    (tmp_path / "loaded").mkdir()
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion",
                                      dst_path=str(tmp_path / "loaded"))
    assert loaded.predict([1.0, 2.5]) == [2.0, 5.0]

    client.delete_registered_model_alias(name, "champion")
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(name, "champion")


def test_unreachable_tracking_server_fails_fast_with_a_clear_message():
    """A tracking URI where no server answers (a stopped server) fails within seconds and
    the message names the URI and what to check."""
    from pilamim.tracking.server import TrackingUnavailable, check_tracking_reachable

    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as err:
        check_tracking_reachable(uri, timeout_s=5.0)
    assert time.monotonic() - started < 10
    message = str(err.value)
    assert uri in message
    assert "MLFLOW_TRACKING_URI" in message


def test_mlflow_client_on_unreachable_server_errors_within_seconds(monkeypatch):
    """With retries capped (as pilamim does while a run is open) the plain MLflow client
    also gives up within seconds instead of retrying for minutes."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(MlflowException) as err:
        MlflowClient(tracking_uri=uri).search_experiments()
    assert time.monotonic() - started < 15
    assert f"127.0.0.1:{uri.rsplit(':', 1)[1]}" in str(err.value)


# -- S3 ------------------------------------------------------------------------------------


def test_s3_rejects_wrong_and_missing_credentials(s3_server):
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    assert MLFLOW_BUCKET in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]

    with pytest.raises(ClientError) as wrong_secret:
        s3_server.client(secret_key="not-the-secret").list_buckets()
    assert wrong_secret.value.response["Error"]["Code"] in {
        "SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId"}

    with pytest.raises(ClientError) as unknown_key:
        s3_server.client(access_key="AKUNKNOWN0000000", secret_key="x").list_buckets()
    assert unknown_key.value.response["Error"]["Code"] in {"InvalidAccessKeyId", "AccessDenied"}

    import boto3

    anonymous = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                             config=Config(signature_version=UNSIGNED))
    with pytest.raises(ClientError):
        anonymous.put_object(Bucket=MLFLOW_BUCKET, Key="anonymous.txt", Body=b"no")


# -- Prefect ---------------------------------------------------------------------------------


def _add(x: int, y: int) -> int:
    return x + y


def test_prefect_server_runs_a_flow_to_completed(prefect_api):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    assert http_ok(f"{prefect_api.api_url}/health")
    add = flow(name="integration-smoke-add")(_add)
    with temporary_settings(updates={PREFECT_API_URL: prefect_api.api_url}):
        state = add(2, 3, return_state=True)
        assert state.is_completed(), state
        assert state.result() == 5
        with get_client(sync_client=True) as client:
            stored = client.read_flow_run(state.state_details.flow_run_id)
    # Recorded by the real server, not an ephemeral one.
    assert stored.state is not None and stored.state.is_completed()


# The process worker running a real deployment end to end: test_pipeline_topology.py.


def test_postgresql_comes_from_the_package_index_and_ci_needs_no_root(monkeypatch):
    """The test command installs and starts everything without root: PostgreSQL's binaries are
    the dev extra's wheel (preferred over any system install), and `.ci/run` calls no system
    package manager."""
    import sys

    from tests.servers.postgres import postgres_bindir

    monkeypatch.delenv("PILAMIM_PG_BINDIR", raising=False)
    assert Path(postgres_bindir()).resolve().is_relative_to(Path(sys.prefix).resolve())
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert not any(word in ci for word in ("apt-get", "apt ", "sudo", "dnf ", "brew "))
