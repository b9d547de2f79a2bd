"""Reconstruction figure: original / masked input / pixel reconstruction for a fixed batch."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pilamim.io import atomic_write  # noqa: E402
from pilamim.model.masking import patchify, unpatchify  # noqa: E402

_GAP = 2  # pixels between images in the figure


def _to_display(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float().cpu() * s + m).clamp(0, 1)


def reconstruction_figure(images: torch.Tensor, pred_patches: torch.Tensor, mask: torch.Tensor,
                          patch: int, mean: list[float], std: list[float], path: str | Path,
                          title: str = "", norm_pix: bool = False) -> Path:
    """Masked patches shown grey; the reconstruction pastes visible patches back (MAE style).

    With ``norm_pix_loss`` the predictions are per-patch normalised, so the figure shows them
    re-scaled to each original patch's mean/std, as MAE's visualisation does.
    """
    images, pred_patches, mask = images.cpu().float(), pred_patches.cpu().float(), mask.cpu()
    channels = images.shape[1]
    target = patchify(images, patch)
    if norm_pix:
        var = target.var(dim=-1, keepdim=True)
        pred_patches = pred_patches * (var + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
    m = mask.unsqueeze(-1)
    masked = unpatchify(target * (1 - m), patch, channels)
    recon = unpatchify(target * (1 - m) + pred_patches * m, patch, channels)
    rows = [("original", images), ("masked", masked), ("reconstruction", recon)]
    grid = _grid([_to_display(batch, mean, std) for _, batch in rows])
    n, size = images.shape[0], images.shape[-1]
    # One axes showing one composed image: 30 subplots took ~0.5 s per figure to lay out.
    fig, ax = plt.subplots(figsize=(max(3.0, 1.3 * n), 4.2))
    ax.imshow(grid[..., 0] if channels == 1 else grid, cmap="gray" if channels == 1 else None,
              vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(size + _GAP) * r + size / 2 for r in range(len(rows))],
                  [label for label, _ in rows], fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
    return out


def _grid(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of (n, C, H, W) images in [0, 1] -> one (H', W', C) array, white gaps between."""
    n, channels, h, w = rows[0].shape
    grid = torch.ones(channels, len(rows) * (h + _GAP) - _GAP, n * (w + _GAP) - _GAP)
    for r, batch in enumerate(rows):
        for c in range(n):
            top, left = r * (h + _GAP), c * (w + _GAP)
            grid[:, top:top + h, left:left + w] = batch[c]
    return grid.permute(1, 2, 0).numpy()
