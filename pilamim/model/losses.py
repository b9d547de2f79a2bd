"""The three PiLaMIM losses, reduced in fp32 and averaged by the real mask count."""

from __future__ import annotations

import torch


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked patches only: (B, N, F) vs (B, N, F), mask (B, N).

    Divides by mask.sum() * F, not by a hard-coded ratio, so any mask count is exact.
    """
    per_patch = (pred.float() - target.float()).pow(2).sum(dim=-1)
    return (per_patch * mask).sum() / (mask.sum() * pred.shape[-1])


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's ``norm_pix`` target: each patch to zero mean, unit variance."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def cls_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE of the predicted [CLS] against the target's, over batch x D, no mask."""
    return (pred.float() - target.float()).pow(2).mean()
