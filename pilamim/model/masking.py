"""Per-sample random masking (MAE style) and patch <-> image reshaping.

Masks are drawn on the model's device from noise the caller may supply, so the trainer can
draw them from its own ``torch.Generator`` (checkpointed, per-rank) without a host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Mask(NamedTuple):
    ids_keep: torch.Tensor  # (B, K) patch indices fed to the encoder, in shuffled order
    ids_restore: torch.Tensor  # (B, N) inverse permutation: shuffled order -> raster order
    mask: torch.Tensor  # (B, N) float, 1 = masked (to predict), 0 = visible, raster order


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible patch count; int() truncation matches the official code (49 at 196, ratio .75)."""
    return max(1, int(num_patches * (1.0 - mask_ratio)))


def random_mask(noise: torch.Tensor, keep: int) -> Mask:
    """Keep the ``keep`` patches with the smallest noise; argsort of uniform noise = random perm."""
    batch, num_patches = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :keep] = 0.0
    return Mask(ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore))


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Select tokens (B, N, D) at per-sample indices (B, K)."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in raster order, pixels (row, col, channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for a square grid."""
    b, n, _ = patches.shape
    side = int(round(n**0.5))
    x = patches.reshape(b, side, side, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, side * patch, side * patch)
