"""Evaluation images decoded once, and the low-level task built from them.

The low-level task ("brightness bin within class"): for each class, the training images are
split into 8 equal-count bins of mean pixel intensity; val/test images get the bin of their
class's training edges. The label is balanced (1/8 per bin in every class) and independent
of the class by construction, so knowing the class is worth exactly chance (12.5 %): a probe
only does better if the frozen features keep how much ink/light the image has, i.e.
pixel-level content that a class-invariant representation may throw away. It plays the role
of the paper's CLEVR count/distance tasks, which also ask for properties the class does not
determine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from pilamim.data.dataset import ManifestDataset
from pilamim.data.prepared import PreparedDataset
from pilamim.data.transforms import eval_transform

NUM_BINS = 8
SPLITS = ("train", "val", "test")
LOWLEVEL_CLASSES = [f"bin{i}" for i in range(NUM_BINS)]


@dataclass
class EvalImages:
    """Eval-transformed images and labels of every split, plus the low-level labels."""

    images: dict[str, Tensor]  # split -> (N, C, H, W) normalised, as the probe sees them
    labels: dict[str, Tensor]  # split -> class index
    bins: dict[str, Tensor]  # split -> brightness bin within class
    edges: Tensor  # (num_classes, NUM_BINS - 1) bin edges from the training split

    def class_sets(self) -> dict[str, TensorDataset]:
        return {s: TensorDataset(self.images[s], self.labels[s]) for s in self.images}

    def pixel_features(self) -> dict[str, Tensor]:
        """The raw-pixel floor's "features": the flattened normalised image."""
        return {s: x.flatten(1) for s, x in self.images.items()}


def load_eval_images(prepared: PreparedDataset, img_size: int) -> EvalImages:
    """Decode every split once with the probe's eval transform (resize, centre crop, norm)."""
    tf = eval_transform(img_size, prepared.mean, prepared.std)
    images, labels = {}, {}
    for split in SPLITS:
        ds = ManifestDataset(prepared, split, tf, cache=False)
        if len(ds) == 0:
            continue
        pairs = [ds[i] for i in range(len(ds))]
        images[split] = torch.stack([p[0] for p in pairs])
        labels[split] = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    mean = torch.tensor(prepared.mean).view(1, -1, 1, 1)
    std = torch.tensor(prepared.std).view(1, -1, 1, 1)
    brightness = {s: (x * std + mean).mean(dim=(1, 2, 3)) for s, x in images.items()}
    edges = within_class_edges(brightness["train"], labels["train"], prepared.num_classes)
    bins = {s: assign_bins(brightness[s], labels[s], edges) for s in images}
    return EvalImages(images, labels, bins, edges)


def within_class_edges(values: Tensor, classes: Tensor, num_classes: int,
                       num_bins: int = NUM_BINS) -> Tensor:
    """Per class, the ``num_bins - 1`` inner quantiles of ``values`` (equal-count bins)."""
    q = torch.linspace(0, 1, num_bins + 1, dtype=torch.float64)[1:-1]
    edges = torch.zeros(num_classes, num_bins - 1, dtype=torch.float64)
    for c in range(num_classes):
        v = values[classes == c].double()
        if v.numel():
            edges[c] = torch.quantile(v, q)
    return edges


def assign_bins(values: Tensor, classes: Tensor, edges: Tensor) -> Tensor:
    """Bin index of each value against its own class's edges (value == edge goes up)."""
    return (values.double().unsqueeze(1) >= edges[classes]).sum(dim=1).long()


def class_only_accuracy(eval_images: EvalImages, split: str = "test") -> float:
    """Best low-level accuracy from the class alone: each class's most common train bin."""
    train_y, train_b = eval_images.labels["train"], eval_images.bins["train"]
    best = {int(c): int(torch.bincount(train_b[train_y == c], minlength=NUM_BINS).argmax())
            for c in train_y.unique()}
    y, b = eval_images.labels[split], eval_images.bins[split]
    guess = torch.tensor([best.get(int(c), 0) for c in y])
    return float((guess == b).float().mean()) if len(b) else 0.0
