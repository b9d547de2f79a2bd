"""Full-state checkpoints for exact resume, written atomically.

Only plain tensors and containers are stored, so ``torch.load(weights_only=True)`` reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pilamim.io import atomic_torch_save

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, mask_generator: torch.Generator, meta: dict[str, Any]) -> Path:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "mask_generator": mask_generator.get_state(),
        "cpu_rng": torch.get_rng_state(),
        "meta": meta,
    }
    return atomic_torch_save(state, path)


def load_checkpoint(path: str | Path, device: torch.device) -> dict[str, Any]:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a torn or foreign file: say which and what to do
        raise RuntimeError(
            f"cannot read checkpoint {path}: {err}; delete it to start over") from err


def stale_reason(saved_meta: dict[str, Any], meta: dict[str, Any]) -> str | None:
    """Why a checkpoint cannot continue this run (model, data or recipe changed), else None.

    Only ``epochs`` and bookkeeping may change between a run and its resume: a longer run
    continues from the checkpoint, anything else is a new experiment.
    """
    changed = [k for k in meta if saved_meta.get(k) != meta[k]]
    if not changed:
        return None
    return "; ".join(f"{k}: {saved_meta.get(k)!r} -> {meta[k]!r}" for k in changed)
