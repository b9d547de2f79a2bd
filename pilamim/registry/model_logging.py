"""Log an exported encoder into the active MLflow run as two loadable models.

* ``embedder`` — pyfunc "model from code" (:mod:`pilamim.registry.embedder`) over raw ``uint8``
  ``(N, H, W, C)`` images of any size and 1, 3 or 4 channels: the one the registry versions,
  so ``mlflow models serve -m models:/<name>@champion`` needs neither our normalisation nor our
  package. Signature: ``uint8 (-1, -1, -1, -1)`` in, ``float32 (-1, D)`` out.
* ``encoder`` — PyTorch flavour (pickle format, so any batch size loads), for the ``nn.Module``
  (its URI goes to the version tag ``encoder_uri``). Input normalised ``float32``
  ``(N, C, H, W)``, output ``(N, D)`` embeddings.

Both carry ``encoder.json`` in their MLmodel metadata and pin the packages they need to the
versions that logged them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pilamim.registry.embedder import load_timm_encoder

# Packages the logged models need at load time (pinned to what logged them).
REQUIRED_PACKAGES = ("torch", "torchvision", "timm", "numpy", "safetensors", "cloudpickle")


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
    encoder_uri: str          # PyTorch flavour (the nn.Module over normalised float32 NCHW)
    feature_dim: int
    input_shape: tuple[int, int, int]   # C, H, W the encoder takes

    @property
    def model_uri(self) -> str:
        """The model the registry versions: the embedder."""
        return self.embedder_uri


def log_encoder_model(encoder_dir: str | Path, *, name: str = "encoder",
                      embedder_name: str = "embedder") -> LoggedEncoder:
    """Log the exported encoder into the active run as the two models of the module docstring.

    Signatures and input examples are numpy; the input examples have batch 2 and the batch
    dimension is -1, so any batch size loads and predicts. The embedder's height, width and
    channels are -1 too (it resizes and converts); MLflow's schema enforcement then checks its
    rank (4) and dtype (``uint8``, which the scoring server also parses JSON ``inputs`` to).
    """
    folder = Path(encoder_dir)
    cfg = read_encoder_config(folder)
    chans, size, dim = int(cfg["in_chans"]), int(cfg["img_size"]), int(cfg["feature_dim"])
    encoder = load_timm_encoder(folder / "encoder.safetensors", cfg)
    reqs = pip_requirements()
    out_schema = Schema([TensorSpec(np.dtype(np.float32), (-1, dim))])

    torch_sig = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, chans, size, size))]),
        outputs=out_schema)
    torch_info = mlflow.pytorch.log_model(
        encoder, name=name, serialization_format="pickle", signature=torch_sig,
        input_example=np.zeros((2, chans, size, size), np.float32), pip_requirements=reqs,
        metadata={"pilamim_encoder": cfg},
    )
    embed_sig = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))]),
        outputs=out_schema)
    embed_info = mlflow.pyfunc.log_model(
        name=embedder_name,
        python_model=str(Path(__file__).with_name("embedder.py")),
        artifacts={"encoder_weights": str(folder / "encoder.safetensors"),
                   "encoder_config": str(folder / "encoder.json")},
        signature=embed_sig, input_example=np.zeros((2, size, size, chans), np.uint8),
        pip_requirements=reqs, metadata={"pilamim_encoder": cfg},
    )
    return LoggedEncoder(embed_info.model_uri, torch_info.model_uri, dim, (chans, size, size))
