"""No pickle between the registry and a user's encoder, against real MLflow stores.

What ``register`` logs holds no pickle stream: code, safetensors and JSON/YAML/text only. And
``models:/<name>@champion`` loads — as the timm module (``load_registered_encoder``) and as the
serving pyfunc — in a fresh process where every unpickler raises (pickle's, ``_pickle``'s and
``torch.load``, whose restricted ``weights_only`` unpickler is still an unpickler) and MLflow's
own ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` is off. The guard is ours, not a stand-in for MLflow:
the same process shows it catching MLflow's pickle path (a PyTorch model pickled the way
``register`` used to log it), so its silence on ours means something. Batch sizes (5, 3) differ
from the input example's (2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from pilamim.registry import embedder as emb
from pilamim.stages import register as register_step
from tests.mlflow_store import FEATURE_DIM, write_metrics, write_prepared

# Bytes a pickle (protocol 2+: b"\x80") or a torch.save / .pt2 zip (b"PK") starts with.
PICKLE_OR_ZIP = (b"\x80", b"PK\x03\x04")

GUARDED_LOAD = """
import pickle, _pickle, sys

class PickleForbidden(RuntimeError):
    pass

def refuse(*args, **kwargs):
    raise PickleForbidden("something tried to unpickle")

def refusing(unpickler):   # keeps the class attributes (read at import), makes no instance
    return type(unpickler.__name__, (unpickler,), {"__init__": refuse, "load": refuse})

for module in (pickle, _pickle):          # before anything else imports them
    module.load = module.loads = refuse
    module.Unpickler = refusing(module.Unpickler)
pickle._load = pickle._loads = refuse
pickle._Unpickler = refusing(pickle._Unpickler)

import torch
import torch._weights_only_unpickler as restricted
torch.load = torch.serialization.load = refuse
restricted.load = refuse
restricted.Unpickler = refusing(restricted.Unpickler)

import os
from pathlib import Path
import mlflow, numpy as np
from pilamim.registry.model_logging import load_registered_encoder

uri, pickled_uri, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
encoder = load_registered_encoder(uri)
with torch.inference_mode():
    embedded = encoder(torch.from_numpy(np.load(out / "normalised.npy"))).numpy()
np.save(out / "encoder.npy", embedded)
np.save(out / "embedder.npy", mlflow.pyfunc.load_model(uri).predict(np.load(out / "raw.npy")))
print("MODULE", type(encoder).__module__, type(encoder).__name__)

# The control: MLflow allowed to unpickle, the guard alone stops the pickled PyTorch model.
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "true"
try:
    mlflow.pytorch.load_model(pickled_uri)
except PickleForbidden:
    print("GUARD CAUGHT THE PICKLED MODEL")
"""


def _register(tmp_path: Path, params) -> tuple[str, dict]:
    """Run the register step (the champion is its version); the ``models:/`` URI of @champion."""
    write_prepared(tmp_path / "data" / "prepared")
    write_metrics(tmp_path / "metrics" / "probe.json", top1=0.5, top5=0.9)
    record = register_step.register(params)
    assert record["action"] == "champion"
    return f"models:/{params.register.model_name}@champion", record


def _log_pickled_encoder(encoder_dir: Path) -> str:
    """The encoder as ``register`` used to log it, pickled (the guard's control)."""
    config = json.loads((encoder_dir / "encoder.json").read_text())
    module = emb.load_timm_encoder(encoder_dir / "encoder.safetensors", config)
    with mlflow.start_run():
        return mlflow.pytorch.log_model(module, name="pickled", serialization_format="pickle",
                                        pip_requirements=["torch"]).model_uri


def test_register_logs_one_model_and_no_pickle(tmp_path, params, encoder_dir):
    uri, record = _register(tmp_path, params)
    run = MlflowClient().get_run(record["run_id"])
    logged = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list",
        filter_string=f"source_run_id = '{record['run_id']}'")
    assert [model.model_uri for model in logged] == [record["logged_model_uri"]]

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    files = {str(p.relative_to(local)): p for p in local.rglob("*") if p.is_file()}
    assert {"MLmodel", "embedder.py", "artifacts/encoder.safetensors",
            "artifacts/encoder.json"} <= set(files)
    for name, path in files.items():
        head = path.read_bytes()[:4]
        assert not head.startswith(PICKLE_OR_ZIP), f"{name} is a pickle or a zip"
        if name.endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as weights:    # a JSON header + tensors
                assert weights.keys()
        else:
            path.read_text(encoding="utf-8")                        # code, JSON, YAML, text
    pyfunc = mlflow.models.Model.load(str(local)).flavors["python_function"]
    assert pyfunc["model_code_path"].endswith("embedder.py")
    assert "python_model" not in pyfunc                     # the cloudpickled PythonModel's key
    assert "cloudpickle" not in files["requirements.txt"].read_text()


def test_champion_loads_where_nothing_can_be_unpickled(tmp_path, params, encoder_dir):
    # A local store: loading through a server's artifact proxy is the same client code
    # (tests/registry/test_server.py loads @champion through a real server).
    uri, _ = _register(tmp_path, params)
    pickled_uri = _log_pickled_encoder(encoder_dir)

    config = json.loads((encoder_dir / "encoder.json").read_text())
    reference = emb.load_timm_encoder(encoder_dir / "encoder.safetensors", config)
    rng = np.random.default_rng(7)
    normalised = rng.standard_normal((5, 1, 16, 16)).astype(np.float32)
    raw = rng.integers(0, 256, size=(3, 24, 20, 3), dtype=np.uint8)   # RGB, larger: converted
    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "normalised.npy", normalised)
    np.save(out / "raw.npy", raw)

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}   # the test's store
    done = subprocess.run([sys.executable, "-c", GUARDED_LOAD, uri, pickled_uri, str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MODULE timm.models.vision_transformer VisionTransformer" in done.stdout
    assert "GUARD CAUGHT THE PICKLED MODEL" in done.stdout, done.stderr[-3000:]

    with torch.inference_mode():
        expected = reference(torch.from_numpy(normalised)).numpy()
        served = reference(emb.images_to_tensor(raw, config)).numpy()
    np.testing.assert_allclose(np.load(out / "encoder.npy"), expected, rtol=1e-5, atol=1e-5)
    embedded = np.load(out / "embedder.npy")
    assert embedded.shape == (3, FEATURE_DIM)
    np.testing.assert_allclose(embedded, served, rtol=1e-5, atol=1e-5)
