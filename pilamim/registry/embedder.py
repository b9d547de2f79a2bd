"""MLflow pyfunc model: a batch of raw images in, one embedding per image out.

Logged by :func:`pilamim.registry.model_logging.log_encoder_model` as a "model from code":
MLflow copies this file into the model and runs it at load time, so it must stay self-contained
(numpy, torch, timm, safetensors and mlflow only; no ``pilamim`` imports). The weights travel as
the model's artifacts ``encoder_weights`` (``encoder.safetensors``) and ``encoder_config``
(``encoder.json``: ``model_name``, ``kwargs``, ``feature_dim``, ``mean``, ``std``, ``img_size``,
``in_chans``) — no pickle involved.

Input: ``uint8`` pixels shaped ``(N, H, W, C)`` (H = W = ``img_size``, C = ``in_chans``; the
layout PIL/numpy give). The model scales to [0, 1], normalises with the training mean/std and
runs the encoder. Output: ``float32`` ``(N, feature_dim)`` — the [CLS] embedding after the final
norm. For already normalised ``float32`` ``(N, C, H, W)`` arrays use the registered
PyTorch-flavour model (logged in the same run) instead. Load-time option:
``model_config={"device": "cuda"}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


def load_timm_encoder(weights: str | Path, config: Mapping[str, Any]):
    """Rebuild the timm encoder from ``encoder.json`` and load ``encoder.safetensors`` strictly."""
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(config["model_name"], pretrained=False, **config["kwargs"])
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


def images_to_tensor(images: np.ndarray, mean, std, in_chans: int):
    """uint8 ``(N, H, W, C)`` (or ``(N, H, W)`` when C = 1) -> normalised float ``(N, C, H, W)``."""
    import torch

    array = np.asarray(images)
    if array.ndim == 3 and in_chans == 1:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] != in_chans:
        raise ValueError(f"expected uint8 images shaped (N, H, W, {in_chans}), got {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels (0..255), got dtype {array.dtype}")
    scaled = array.astype(np.float32) / 255.0
    scaled = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(0, 3, 1, 2)))


class EncoderEmbedder(PythonModel):
    """Raw uint8 images -> encoder embeddings (see the module docstring)."""

    batch_size = 256
    # Our explicit tensor signature validates inputs; this skips MLflow's type-hint wrapper
    # (and its "add type hints" warning), which cannot describe numpy image batches.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import torch

        self.config = json.loads(Path(context.artifacts["encoder_config"]).read_text())
        device = (context.model_config or {}).get("device")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder = load_timm_encoder(context.artifacts["encoder_weights"], self.config)
        self.encoder.to(self.device)

    def predict(self, context, model_input, params=None):
        import torch

        cfg = self.config
        x = images_to_tensor(model_input, cfg["mean"], cfg["std"], int(cfg["in_chans"]))
        outputs = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.batch_size):
                chunk = x[start:start + self.batch_size].to(self.device)
                outputs.append(self.encoder(chunk).float().cpu())
        if not outputs:
            return np.zeros((0, int(cfg["feature_dim"])), np.float32)
        return torch.cat(outputs).numpy()


mlflow.models.set_model(EncoderEmbedder())
