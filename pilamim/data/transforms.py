"""Image transforms for pretraining and evaluation (PIL image in, normalised tensor out).

They draw randomness from torch's generator only, which is what lets
:class:`~pilamim.data.dataset.ManifestDataset` make a sample's augmentation a function of
``(index, seed)`` alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

# Evaluation resizes to img_size / EVAL_CROP_RATIO then centre-crops (the usual 224 -> 256).
EVAL_CROP_RATIO = 0.875
# Below this size (Fashion-MNIST, CIFAR) images are used whole: cropping would cut content.
EVAL_RESIZE_MIN = 64


def to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """PIL -> float32 CxHxW in [0, 1] -> ``(x - mean) / std`` per channel."""
    return T.Compose([T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


def pretrain_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_scale: tuple[float, float] = (0.2, 1.0),
    hflip: bool = True,
) -> T.Compose:
    """MAE-style augmentation: RandomResizedCrop (bicubic) + optional horizontal flip."""
    steps: list = [T.RandomResizedCrop(img_size, scale=tuple(crop_scale),
                                       interpolation=InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps.append(to_normalized_tensor(mean, std))
    return T.Compose(steps)


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Deterministic: resize the shorter side, centre-crop ``img_size``, normalise."""
    resize = int(img_size / EVAL_CROP_RATIO) if img_size >= EVAL_RESIZE_MIN else img_size
    return T.Compose([
        T.Resize(resize, interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        to_normalized_tensor(mean, std),
    ])
