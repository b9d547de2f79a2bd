"""Frozen-encoder feature extraction: one pass, cached on the CPU.

The encoder's default forward (timm ViT with ``num_classes=0, global_pool="token"``) returns
the [CLS] token after the final norm, which is what the paper's probe reads.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from pilamim.data.memory_split import collate_fn_for
from pilamim.device import autocast


def make_loader(dataset: Dataset, batch_size: int, device: torch.device, num_workers: int = 0,
                shuffle: bool = False, drop_last: bool = False,
                generator: torch.Generator | None = None,
                sampler: Sampler | None = None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=device.type == "cuda",
                      generator=generator, persistent_workers=False, sampler=sampler,
                      collate_fn=collate_fn_for(dataset))


def extract_features(encoder: nn.Module, dataset: Dataset, batch_size: int,
                     device: torch.device | str, num_workers: int = 0,
                     dtype: torch.dtype | None = None,
                     desc: str = "features") -> tuple[Tensor, Tensor]:
    """Run ``encoder`` over ``dataset`` in eval mode; return (features [N, D] fp32, labels [N]).

    The encoder is moved to ``device`` and left in the train/eval mode it came in with.
    ``dtype`` enables autocast (bf16 on CUDA); features are always returned as fp32 on the CPU.
    """
    device = torch.device(device)
    was_training = encoder.training
    encoder.to(device).eval()
    loader = make_loader(dataset, batch_size, device, num_workers)
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        with torch.inference_mode():
            for images, targets in tqdm(loader, desc=desc, leave=False,
                                        disable=not sys.stderr.isatty()):
                images = images.to(device, non_blocking=True)
                with autocast(device, dtype):
                    out = encoder(images)
                if out.ndim != 2:
                    raise ValueError(
                        f"encoder returned shape {tuple(out.shape)}; expected [B, D] pooled "
                        "features (build it with num_classes=0, global_pool='token')"
                    )
                feats.append(out.float().cpu())
                labels.append(torch.as_tensor(targets).long().cpu())
    finally:
        encoder.train(was_training)
    if not feats:
        raise ValueError("cannot extract features from an empty dataset")
    # Concatenating outside inference mode yields ordinary tensors that autograd may save.
    return torch.cat(feats).clone(), torch.cat(labels).clone()
