"""The whole pipeline in the production topology, and what a user sees when a server is down.

Real servers on 127.0.0.1 (tests/integration/conftest.py): the flow is deployed from the
repository's ``prefect.yaml`` with ``prefect deploy``, run by a process worker, tracked on an
MLflow server (PostgreSQL store, artifacts in SeaweedFS S3); the champion it registers loads
in a fresh process that holds no S3 credentials. The same run is then searched for the S3
secret the worker hands its flow runs: it must appear in no MLflow param, tag or artifact,
no Prefect log and no error message.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pilamim.params_files import dump_params
from tests.flows.support import FOREIGN_ENV, REPO, make_dvc_repo, tiny_params
from tests.integration.conftest import DATA_BUCKET, WORK_POOL
from tests.servers.mlflow_server import mlflow_server
from tests.servers.prefect_server import prefect_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_SCRUB = ("AWS_", "MLFLOW_", "PREFECT_API_", "PILAMIM_")


def _env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """This interpreter's environment without any server, credential or run-linking setting,
    plus ``settings``: each scenario states exactly what its process is configured with."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_SCRUB) and k not in FOREIGN_ENV}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
               AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"), AWS_EC2_METADATA_DISABLED="true",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    env.update(settings)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _bin(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else name


def _pipeline_repo(root: Path, model_name: str) -> Path:
    """A git + DVC repo like this one: tiny params, the flow and the deployment definition."""
    params = tiny_params()
    params.register.model_name = model_name
    repo = make_dvc_repo(root, params)
    shutil.copytree(REPO / "flows", repo / "flows",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "prefect.yaml", repo / "prefect.yaml")
    return repo


def _digests(root: Path, *folders: str) -> dict[str, str]:
    out = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# -- the whole pipeline, deployed ------------------------------------------------------------


def _load_champion_in_fresh_process(tmp_path: Path, tracking_uri: str, name: str) -> dict:
    code = f"""
import json, mlflow, numpy as np
model = mlflow.pyfunc.load_model("models:/{name}@champion")
images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
out = np.asarray(model.predict(images))
print(json.dumps({{"shape": list(out.shape), "finite": bool(np.isfinite(out).all())}}))
"""
    done = _run([sys.executable, "-c", code], tmp_path,
                _env(tmp_path, MLFLOW_TRACKING_URI=tracking_uri), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mlflow_texts(tracking_uri: str, pipeline_id: str, tmp_path: Path) -> list[str]:
    """Every param, tag and artifact byte of the pipeline's runs, and its model versions' tags,
    read back through the server (the client has no S3 credentials)."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`pilamim.pipeline_id` = '{pipeline_id}'")
    assert len(runs) >= 7, [r.data.tags.get("mlflow.runName") for r in runs]  # parent + 6 stages
    texts = []
    for run in runs:
        texts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        dest = tmp_path / "artifacts" / run.info.run_id
        dest.mkdir(parents=True)
        if client.list_artifacts(run.info.run_id):
            mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(dest),
                                                tracking_uri=tracking_uri)
        texts += [p.read_bytes().decode("latin-1") for p in dest.rglob("*") if p.is_file()]
    for mv in client.search_model_versions():
        texts += [f"{k}={v}" for k, v in mv.tags.items()]
    return texts


def _prefect_texts(api_url: str, flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            run = client.read_flow_run(flow_run_id)
    assert logs, "the flow run wrote no logs to the server"
    return [log.message for log in logs] + [json.dumps(run.parameters, default=str),
                                            str(run.state)]


def test_deployed_pipeline_completes_and_its_champion_loads_through_the_server(
        tmp_path, s3_server, mlflow_tracking_server, prefect_api, prefect_process_worker):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    name = f"pilamim-topology-{uuid.uuid4().hex[:8]}"
    repo = _pipeline_repo(tmp_path / "repo", name)
    env = _env(tmp_path, PREFECT_API_URL=prefect_api.api_url)
    deployed = _run([_bin("prefect"), "--no-prompt", "deploy", "--name", "nightly",
                     "--pool", WORK_POOL], repo, env, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]

    with temporary_settings(updates={PREFECT_API_URL: prefect_api.api_url}):
        run = run_deployment("pilamim-pipeline/nightly", timeout=900)
    worker_log = prefect_process_worker.log_path.read_text(errors="replace")
    assert run.state is not None and run.state.is_completed(), \
        f"{run.state!r}\n{worker_log[-4000:]}"

    # The flow ran in the deployment's working directory (this repo), through DVC's stages.
    record = json.loads((repo / "metrics/register.json").read_text())
    assert record["action"] == "champion"
    assert (repo / "dvc.lock").is_file()
    loaded = _load_champion_in_fresh_process(tmp_path, mlflow_tracking_server.tracking_uri, name)
    assert loaded == {"shape": [3, 32], "finite": True}  # micro encoder: 32 features

    # The artifacts really are in S3 (the server proxies them; nothing on local disk).
    keys = [o["Key"] for page in s3_server.client().get_paginator("list_objects_v2").paginate(
        Bucket="pilamim-mlflow") for o in page.get("Contents", [])]
    assert any(k.endswith("encoder.safetensors") for k in keys)

    # The secret the worker gave the flow run leaks nowhere.
    secret = s3_server.secret_key
    pipeline_id = record["pipeline_id"]
    texts = _mlflow_texts(mlflow_tracking_server.tracking_uri, pipeline_id, tmp_path)
    texts += _prefect_texts(prefect_api.api_url, run.id)
    texts += [worker_log]
    assert secret in "".join(s3_server.env().values())  # the secret we look for is the real one
    leaks = [t[:200] for t in texts if secret in t]
    assert not leaks, leaks


# -- servers down, as the pipeline sees them -------------------------------------------------


def test_stopped_servers_give_clear_errors_lose_nothing_and_the_rerun_completes(tmp_path):
    """Its own MLflow and Prefect servers, really stopped: MLflow after pretraining, then
    Prefect. Each error names the endpoint and what to check, within seconds; pretraining's
    outputs stay as they were; with both servers back (same ports, same stores) the rerun
    finishes only what is left."""
    name = f"pilamim-outage-{uuid.uuid4().hex[:8]}"
    repo = _pipeline_repo(tmp_path / "repo", name)
    ml_dir, pf_dir = tmp_path / "mlflow", tmp_path / "prefect"
    cli = [sys.executable, "-m", "pilamim.cli"]
    with prefect_server(pf_dir) as pf:
        pf_port, api = pf.port, pf.api_url
        with mlflow_server(ml_dir) as ml:
            uri, ml_port = ml.tracking_uri, ml.port
            env = _env(tmp_path, MLFLOW_TRACKING_URI=uri, PREFECT_API_URL=api)
            done = _run([sys.executable, "-m", "dvc", "repro", "pretrain"], repo, env)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        saved = _digests(repo, "data", "models", "metrics")
        saved["dvc.lock"] = hashlib.sha256((repo / "dvc.lock").read_bytes()).hexdigest()
        assert any(k.endswith("checkpoint.pt") for k in saved)

        # MLflow stopped: the flow stops in seconds, naming the server, with the exit code
        # of a transient failure (69: run it again later).
        t0 = time.monotonic()
        down = _run([*cli, "run"], repo, env)
        assert down.returncode == 69, down.stdout[-2000:] + down.stderr[-2000:]
        assert time.monotonic() - t0 < 120
        assert f"MLflow tracking server {uri} is unreachable" in down.stderr
        assert "MLFLOW_TRACKING_URI" in down.stderr

    # Prefect stopped too: refused before any stage starts.
    no_prefect = _run([*cli, "run"], repo, env)
    assert no_prefect.returncode == 69
    assert f"Prefect API {api} is unreachable" in no_prefect.stderr
    assert "PREFECT_API_URL" in no_prefect.stderr

    now = _digests(repo, "data", "models", "metrics")
    now["dvc.lock"] = hashlib.sha256((repo / "dvc.lock").read_bytes()).hexdigest()
    assert now == saved, "a failed run changed what was already saved"

    # Both back on their ports, with their stores: the rerun completes what is left.
    with prefect_server(pf_dir, port=pf_port), mlflow_server(ml_dir, port=ml_port) as ml:
        done = _run([*cli, "run"], repo, env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        summary = json.loads(done.stdout[done.stdout.index("{"):])
        assert summary["decision"] == "champion"
        from mlflow import MlflowClient

        client = MlflowClient(ml.tracking_uri)
        assert client.get_model_version_by_alias(name, "champion").version == "1"
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        stages = {r.data.tags.get("pilamim.stage") for r in runs}
        assert {"pretrain", "probe", "finetune", "register"} <= stages  # before and after
    assert _digests(repo, "models")["models/pretrain/checkpoint.pt"] == \
        saved["models/pretrain/checkpoint.pt"], "pretraining ran again"


def test_wrong_s3_credentials_in_a_stage_name_the_endpoint_and_keep_the_data(
        tmp_path, s3_server):
    """``pilamim fetch`` from an S3 data source: wrong credentials fail with the endpoint and
    the settings to check, never the secret; what an earlier fetch saved stays; the right
    credentials fetch again."""
    from PIL import Image

    prefix = f"topology-{uuid.uuid4().hex[:8]}"
    client = s3_server.client()
    for label in ("cat", "dog"):
        for i in range(3):
            buf = io.BytesIO()
            Image.new("L", (16, 16), 40 * i + (100 if label == "dog" else 0)).save(buf, "PNG")
            client.put_object(Bucket=DATA_BUCKET, Key=f"{prefix}/{label}/{i}.png",
                              Body=buf.getvalue())
    work = tmp_path / "work"
    dump_params(tiny_params(), work / "params")
    fetch = [sys.executable, "-m", "pilamim.cli", "fetch", "--no-track",
             "--set", f"data.source=s3://{DATA_BUCKET}/{prefix}"]
    good = _env(tmp_path, **s3_server.env())
    done = _run(fetch, work, good)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = _digests(work, "data")
    assert any(name.endswith(".pilamim-inventory.jsonl") for name in saved), saved

    wrong_secret = "not-the-secret-" + uuid.uuid4().hex
    bad = {**good, "AWS_SECRET_ACCESS_KEY": wrong_secret}
    failed = _run(fetch, work, bad)
    assert failed.returncode == 1
    assert s3_server.endpoint_url in failed.stderr
    assert "AWS_ACCESS_KEY_ID" in failed.stderr or "credentials" in failed.stderr
    for secret in (s3_server.secret_key, wrong_secret):
        assert secret not in failed.stdout + failed.stderr
    assert _digests(work, "data") == saved

    again = _run(fetch, work, good)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _digests(work, "data") == saved
