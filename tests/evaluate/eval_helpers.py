"""Tiny encoders and synthetic, learnable data sets so every evaluation test runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

ENCODER_KWARGS = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                      class_token=True, no_embed_class=True, qkv_bias=False, num_classes=0,
                      global_pool="token")
CLASSES = ["a", "b", "c", "d"]


def make_encoder(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **ENCODER_KWARGS)


def synthetic_images(n: int, seed: int, num_classes: int = 4, size: int = 16) -> TensorDataset:
    """Class c: a bright 8x8 blob in quadrant c plus a class-dependent brightness, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = 0.3 * torch.randn(n, 1, size, size, generator=gen)
    half = size // 2
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c % 4, 2)
        images[i, :, r * half:(r + 1) * half, q * half:(q + 1) * half] += 2.0
        images[i] += 0.25 * c
    return TensorDataset(images, labels)


def write_encoder_dir(path: Path, model: torch.nn.Module, kwargs: dict | None = None,
                      state: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "encoder.safetensors"))
    spec = {"model_name": "vit_tiny_patch16_224", "kwargs": kwargs or ENCODER_KWARGS,
            "feature_dim": 32, "mean": [0.0], "std": [1.0], "img_size": 16, "in_chans": 1}
    (path / "encoder.json").write_text(json.dumps(spec))
    return path
