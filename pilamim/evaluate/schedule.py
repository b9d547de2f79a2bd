"""Per-iteration learning-rate schedule for the evaluation protocols (warm-up, then cosine)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, total: int, warmup: int, base: float, final: float = 0.0) -> float:
    """lr at optimizer step ``step`` (0-based) of ``total``: linear warm-up, then cosine.

    Warm-up reaches ``base`` at its last step ((step + 1) / warmup, so step 0 is not wasted on
    a zero lr); the cosine then decays from ``base`` to ``final`` over the remaining steps.
    """
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, honouring timm's per-group ``lr_scale`` (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
