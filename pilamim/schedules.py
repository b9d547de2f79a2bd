"""Per-iteration schedules shared by pretraining and the evaluation protocols.

The official code steps lr once per epoch; pretraining keeps that as ``schedule_unit: epoch``.
"""

from __future__ import annotations

import math


def cosine_with_warmup(step: float, total: float, warmup: float, peak: float,
                       final: float = 0.0) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup`` steps, then cosine to ``final``."""
    if warmup > 0 and step < warmup:
        return peak * step / warmup
    if total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / (total - warmup))
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear(step: float, total: float, start: float, end: float) -> float:
    """EMA momentum: from ``start`` at step 0 to ``end`` at ``total``."""
    if total <= 0:
        return end
    return start + (end - start) * min(1.0, step / total)


def set_lr(optimizer, lr: float) -> None:
    """Set every group's lr, honouring timm's per-group ``lr_scale`` (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
