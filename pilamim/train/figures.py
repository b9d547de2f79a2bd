"""Reconstruction figure: original / masked input / pixel reconstruction for a fixed batch."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pilamim.io import atomic_write  # noqa: E402
from pilamim.model.masking import patchify, unpatchify  # noqa: E402


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
    n = images.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n, 4.2), squeeze=False)
    for r, (label, batch) in enumerate(rows):
        shown = _to_display(batch, mean, std)
        for c in range(n):
            ax = axes[r][c]
            img = shown[c].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if channels == 1 else img, cmap="gray" if channels == 1 else None,
                      vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
    return out
