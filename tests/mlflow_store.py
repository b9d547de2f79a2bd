"""Fixtures for the MLflow tests (tests/tracking, tests/registry): a private SQLite store per
test and a tiny exported encoder. Each folder's conftest.py imports them.

Every test runs in its own temporary folder with ``MLFLOW_TRACKING_URI`` pointing at a SQLite
file there, so nothing touches the repository's ``mlflow.db`` and tests never see each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import mlflow
import pytest
import timm
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from pilamim.config import Params

TINY_KWARGS = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                   class_token=True, no_embed_class=True, qkv_bias=False, num_classes=0,
                   global_pool="token")
FEATURE_DIM = 32


def export_tiny_encoder(out_dir: Path, seed: int = 0, dataset_digest: str | None = None) -> dict:
    """Write encoder.safetensors + encoder.json the way the pretrain stage does, pretrained
    (by default) on the data :func:`write_prepared` writes."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_KWARGS).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out_dir / "encoder.safetensors"))
    config = {"model_name": "vit_tiny_patch16_224", "kwargs": TINY_KWARGS,
              "feature_dim": FEATURE_DIM, "mean": [0.286], "std": [0.353], "img_size": 16,
              "in_chans": 1, "dataset_digest": dataset_digest or prepared_digest()}
    (out_dir / "encoder.json").write_text(json.dumps(config))
    return config


def _manifest(n: int) -> str:
    rows = ["path,label,split,sha256"]
    for i in range(n):
        split = "train" if i < n - 4 else ("val" if i < n - 2 else "test")
        label = ["shirt", "shoe"][i % 2]
        rows.append(f"{label}/{i}.png,{label},{split},{hashlib.sha256(bytes([i])).hexdigest()}")
    return "\n".join(rows) + "\n"


def prepared_digest(n: int = 12) -> str:
    """The digest :func:`write_prepared` gives its data set."""
    return hashlib.sha256(_manifest(n).encode()).hexdigest()


def write_prepared(out_dir: Path, n: int = 12) -> str:
    """A minimal manifest.csv + dataset.json (the prepare stage's output contract)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(n)
    (out_dir / "manifest.csv").write_text(manifest)
    digest = hashlib.sha256(manifest.encode()).hexdigest()
    (out_dir / "dataset.json").write_text(json.dumps({
        "root": str(out_dir.parent / "raw"), "classes": ["shirt", "shoe"], "channels": 1,
        "mean": [0.286], "std": [0.353], "counts": {}, "skipped": 0, "digest": digest}))
    return digest


def write_metrics(path: Path, lineage: dict | None = None, **values: float) -> None:
    """A probe/finetune metrics file; its lineage says it measured the encoder now in
    ``models/pretrain`` (of the cwd) on :func:`write_prepared`'s data, unless given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = Path("models/pretrain/encoder.safetensors")
    sha = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.exists() else "none"
    lineage = lineage or {"dataset_digest": prepared_digest(), "encoder_sha256": sha,
                          "protocol": f"{path.stem}:test"}
    path.write_text(json.dumps({**values, "lineage": lineage}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its schema created once (migrations take seconds)."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path, monkeypatch, empty_store) -> str:
    """cd into tmp_path; MLflow writes only to tmp_path/mlflow.db (+ tmp_path/mlartifacts).

    The store is a copy of :func:`empty_store`, so each test has a private, real store.
    """
    monkeypatch.chdir(tmp_path)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PILAMIM_EXPERIMENT", "pilamim-test")
    for name in ("PILAMIM_PIPELINE_ID", "PILAMIM_PARENT_RUN_ID", "MLFLOW_RUN_ID",
                 "PREFECT__FLOW_RUN_ID", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(name, raising=False)
    # System metrics every 0.5 s instead of 10 s, so short test runs still record some.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def encoder_dir(tmp_path) -> Path:
    export_tiny_encoder(tmp_path / "models" / "pretrain")
    return tmp_path / "models" / "pretrain"


@pytest.fixture
def params() -> Params:
    """Default params; their relative paths resolve inside tmp_path (the cwd)."""
    return Params()


def wait_until_up(proc, url: str, log_path: Path, what: str, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log tail if ``proc`` exits or
    ``timeout_s`` passes."""
    import time

    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not start:\n" + log_path.read_text()[-3000:])
        time.sleep(0.5)


def stop_process_group(proc) -> None:
    """SIGTERM a server's process group (uvicorn workers included), SIGKILL if it lingers."""
    import os
    import signal
    import subprocess

    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
