"""AdamW with the MAE/I-JEPA weight-decay convention."""

from __future__ import annotations

import torch
from torch import nn

_NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token")


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """No decay on biases, norms and tokens (1-D params) unless ``decay_all`` (official code)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.split(".")[-1] in _NO_DECAY_NAMES
        (no_decay if skip and not decay_all else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                decay_all: bool, device: torch.device) -> torch.optim.AdamW:
    """Fused AdamW on CUDA (one kernel for all params); the foreach path elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, weight_decay, decay_all), lr=lr, betas=betas,
                             fused=fused, foreach=None if fused else True)
