"""Defaults, constants and device helpers shared by step and data mode."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from pilamim.data.pretrain_input import FILE_PIPELINES as PIPELINES  # noqa: F401 (the CLI)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Dense bf16 peak of one H100 SXM / H200 (the figure the MFU column uses).
H100_BF16_PEAK_TFLOPS = 989.0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JPEG_SUFFIXES = (".jpeg", ".jpg")
# Relative |loss_optimised - loss_fp32| / |loss_fp32| accepted per precision.
LOSS_MATCH_TOL = {"fp32": 1e-4, "bf16": 2e-2}

STEP_DEFAULTS: dict[str, Any] = dict(
    mode="step", size="base", preset="pilamim", img_size=224, patch_size=16, batch=256,
    precision="auto", compile=False, compile_mode=None, decoder_depth=6, decoder_width=384,
    decoder_heads=12, mask_ratio=0.75, accum=1, steps=30, warmup=5, device="auto", seed=0,
    flop_batch=None, loss_match=True, peak_tflops=None, profile=False, patch_matmul=True,
    label=None,
)
DATA_DEFAULTS: dict[str, Any] = dict(
    mode="data", data=None, pipeline="pil", workers=8, batch=256, img_size=224, batches=16,
    warmup_batches=2, device="auto", seed=0, label=None,
    train=None,  # a dict of step settings: every batch also goes through that training step
)


def _resolve_device(name: str) -> torch.device:
    from pilamim.device import resolve_device

    device = resolve_device(name)
    if device.type == "cuda":  # an explicit index, and an allocator that memory stats accept
        device = torch.device("cuda", torch.cuda.current_device())
        torch.zeros(1, device=device)
    return device



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
