"""Log an exported encoder into the active MLflow run as one pickle-free model, and load it back.

The model is ``embedder``, a pyfunc "model from code" (:mod:`pilamim.registry.embedder`) over
raw ``uint8`` ``(N, H, W, C)`` images of any size and 1, 3 or 4 channels: the one the registry
versions, so ``mlflow models serve -m models:/<name>@champion`` needs neither our normalisation
nor our package. Signature: ``uint8 (-1, -1, -1, -1)`` in, ``float32 (-1, D)`` out. Its files
are the code (``embedder.py``), ``encoder.safetensors``, ``encoder.json`` and MLflow's YAML/JSON
metadata: no pickle, so loading it runs no code from the registry but ours.

:func:`load_registered_encoder` gives the encoder inside as a plain timm ``nn.Module`` (input
normalised ``float32`` ``(N, C, H, W)``, any batch size) from those two artifacts. No
PyTorch-flavour model is logged: its only format that keeps ``timm``'s module (``pickle``)
unpickles code at load time, and ``pt2`` still unpickles (with torch's restricted unpickler) and
gives a traced graph, not the timm module; either would also store the weights a second time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec

from pilamim.registry.embedder import CONFIG_ARTIFACT, WEIGHTS_ARTIFACT, load_timm_encoder

# Packages the logged model needs at load time (pinned to what logged it; no cloudpickle).
REQUIRED_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow", "safetensors")


def read_encoder_config(encoder_dir: str | Path) -> dict[str, Any]:
    """``encoder.json`` of an exported encoder; missing -> "run `pilamim pretrain` first"."""
    folder = Path(encoder_dir)
    weights, config = folder / "encoder.safetensors", folder / "encoder.json"
    if not weights.exists() or not config.exists():
        raise FileNotFoundError(f"{folder} has no encoder.safetensors + encoder.json — "
                                f"run `pilamim pretrain` first")
    return json.loads(config.read_text())


def pip_requirements() -> list[str]:
    """Exact versions of :data:`REQUIRED_PACKAGES` as installed (local tags like +cu128 cut)."""
    reqs = []
    for name in REQUIRED_PACKAGES:
        try:
            reqs.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


@dataclass(frozen=True)
class LoggedEncoder:
    embedder_uri: str         # pyfunc over raw uint8 images: the one to register
    feature_dim: int
    input_shape: tuple[int, int, int]   # C, H, W the encoder takes

    @property
    def model_uri(self) -> str:
        """The model the registry versions: the embedder."""
        return self.embedder_uri


def log_encoder_model(encoder_dir: str | Path, *, name: str = "embedder") -> LoggedEncoder:
    """Log the exported encoder into the active run as the model of the module docstring.

    The signature and input example are numpy; the input example has batch 2 and every input
    dimension is -1, so any batch size and image size loads and predicts (the embedder resizes
    and converts); MLflow's schema enforcement then checks the rank (4) and dtype (``uint8``,
    which the scoring server also parses JSON ``inputs`` to).
    """
    folder = Path(encoder_dir)
    cfg = read_encoder_config(folder)
    chans, size, dim = int(cfg["in_chans"]), int(cfg["img_size"]), int(cfg["feature_dim"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]))
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("embedder.py")),     # code, not a pickle
        artifacts={WEIGHTS_ARTIFACT: str(folder / "encoder.safetensors"),
                   CONFIG_ARTIFACT: str(folder / "encoder.json")},
        signature=signature, input_example=np.zeros((2, size, size, chans), np.uint8),
        pip_requirements=pip_requirements(), metadata={"pilamim_encoder": cfg},
    )
    return LoggedEncoder(info.model_uri, dim, (chans, size, size))


def load_registered_encoder(model_uri: str):
    """The encoder of a logged embedder (``models:/pilamim-encoder@champion``, a version, or a
    logged model's URI) as a plain timm ``nn.Module``, eval mode, on the CPU.

    Why not ``mlflow.pytorch.load_model``: that unpickles whatever the registry holds. This
    reads ``encoder.json`` and ``encoder.safetensors`` (tensors only) and rebuilds the module
    with ``timm.create_model``; nothing is unpickled. Its ``pretrained_cfg`` carries our input
    size, mean and std, so ``timm.data.resolve_data_config(model=encoder)`` gives the
    evaluation transform.
    """
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    pyfunc = Model.load(str(local)).flavors.get("python_function", {})
    artifacts = pyfunc.get("artifacts") or {}
    if WEIGHTS_ARTIFACT not in artifacts or CONFIG_ARTIFACT not in artifacts:
        raise ValueError(f"{model_uri} has no {WEIGHTS_ARTIFACT}/{CONFIG_ARTIFACT} artifacts: "
                         f"not a pilamim embedder (a version registered before the embedder "
                         f"was the registered model names one in its tag embedder_uri)")
    config = json.loads((local / artifacts[CONFIG_ARTIFACT]["path"]).read_text())
    return load_timm_encoder(local / artifacts[WEIGHTS_ARTIFACT]["path"], config)
