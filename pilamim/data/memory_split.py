"""A split decoded once into one uint8 tensor: a batch is one gather, flipped and normalised as a
tensor, with no per-image PIL work.

Why: the embedded set's 28 px images need no resize or crop, yet the PIL path spent ~300 us per
image per epoch (conversion, a no-op RandomResizedCrop, ToTensor, Normalize, a forked RNG for
the per-sample seed) -- a third of a bf16 pretraining step on 2 cores. Here every image is
decoded once (through :class:`~pilamim.data.dataset.ManifestDataset`, so 16-bit images and
channel modes are handled as everywhere else) and a batch costs one index and two float ops.

It applies only where it gives what the PIL transform gives: every image already
``img_size`` square (the PIL resize and a ``(1, 1)`` crop scale are then the identity, which
``tests/data/test_memory_split.py`` checks bit for bit), augmentation no more than a
horizontal flip, and the split within ``MEMORY_SPLIT_MAX_BYTES``. :func:`memory_split` returns
None otherwise, and the caller keeps the PIL path.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from pilamim.data.dataset import ManifestDataset, augmentation_seed
from pilamim.data.prepared import PreparedDataset
from pilamim.data.transforms import EVAL_RESIZE_MIN, eval_transform

# The largest split kept decoded (uint8 bytes): ImageNet-1k at 224 px is ~180 GB and stays on
# the PIL path; the embedded set is 9.4 MB.
MEMORY_SPLIT_MAX_BYTES = 2 << 30
# Decoded splits by (data digest, split, channels, size), held only while a MemorySplit uses
# them: pretraining's loader, kNN monitor, figure and val losses share one decode per split.
_DECODED: weakref.WeakValueDictionary[tuple, Tensor] = weakref.WeakValueDictionary()


class MemorySplit(Dataset):
    """``images`` uint8 (N, C, S, S) + labels; ``hflip`` the probability of a horizontal flip.

    Keys are an index, or ``(index, seed)`` as pretraining's sampler gives them: there the flip
    is a function of the pair (as the PIL path's is), so a resumed epoch flips as the first
    run did; with plain indices it is drawn from the global torch RNG, once per batch.
    Read through a DataLoader built with ``collate_fn=`` :func:`collate_batch`.
    """

    def __init__(self, images: Tensor, labels: Sequence[int], mean: Sequence[float],
                 std: Sequence[float], hflip: float = 0.0) -> None:
        self.images = images
        self.labels = [int(label) for label in labels]  # as ManifestDataset.labels
        self._label_tensor = torch.as_tensor(self.labels, dtype=torch.long)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.hflip = float(hflip)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        images, labels = self.__getitems__([key])
        return images[0], int(labels[0])

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> tuple[Tensor, Tensor]:
        seeded = bool(keys) and isinstance(keys[0], tuple)
        index = torch.tensor([k[0] for k in keys] if seeded else list(keys), dtype=torch.long)
        # As ToTensor then Normalize compute it, so both paths give the same floats.
        images = self.images[index].float().div_(255).sub_(self.mean).div_(self.std)
        if self.hflip > 0:
            flip = self._flips(keys) if seeded else torch.rand(len(keys)) < self.hflip
            images[flip] = images[flip].flip(-1)
        return images, self._label_tensor[index]

    def _flips(self, keys: Sequence[tuple[int, int]]) -> Tensor:
        """One uniform draw per ``(index, seed)`` from its mixed seed (53 bits)."""
        draws = [(augmentation_seed(i, s) >> 10) / float(1 << 53) for i, s in keys]
        return torch.tensor(draws) < self.hflip


def collate_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """:meth:`MemorySplit.__getitems__` already returns the collated batch."""
    return batch


def collate_fn_for(dataset: Dataset):
    """The DataLoader ``collate_fn`` a dataset needs: :func:`collate_batch` for a
    :class:`MemorySplit` or a ``Subset`` of one (whose ``__getitems__`` passes the batch on),
    else None (torch's default)."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    return collate_batch if isinstance(base, MemorySplit) else None


def memory_split(source: ManifestDataset, img_size: int, mean: Sequence[float],
                 std: Sequence[float], hflip: float = 0.0,
                 max_bytes: int = MEMORY_SPLIT_MAX_BYTES) -> MemorySplit | None:
    """``source``'s images decoded into a :class:`MemorySplit`, or None where the tensor path
    would not give the PIL path's images: the split is over ``max_bytes`` (checked before any
    decoding) or an image is not ``img_size`` square. Decoded images stay in ``source``'s cache
    either way, so a None costs the PIL path nothing it would not have spent."""
    n = len(source)
    if n == 0 or n * source.channels * img_size * img_size > max_bytes:
        return None
    key = (source.digest, source.split, source.channels, img_size)
    images = _DECODED.get(key)
    if images is None:
        images = torch.empty(n, source.channels, img_size, img_size, dtype=torch.uint8)
        for i in range(n):
            array = np.array(source.load_image(i))  # a writable copy for torch.from_numpy
            if array.shape[:2] != (img_size, img_size):
                return None
            images[i] = torch.from_numpy(array.reshape(img_size, img_size, -1)).permute(2, 0, 1)
        _DECODED[key] = images
    return MemorySplit(images, source.labels, mean, std, hflip)


def eval_dataset(prepared: PreparedDataset, split: str, img_size: int) -> Dataset:
    """A split as evaluation sees it (:func:`~pilamim.data.transforms.eval_transform`): in
    memory below ``EVAL_RESIZE_MIN`` px, where that transform only resizes to ``img_size`` and
    so is the identity on images already that size; else (or when :func:`memory_split` says
    no) the PIL dataset."""
    source = ManifestDataset(prepared, split, eval_transform(img_size, prepared.mean,
                                                             prepared.std))
    in_memory = (memory_split(source, img_size, prepared.mean, prepared.std)
                 if img_size < EVAL_RESIZE_MIN else None)
    return source if in_memory is None else in_memory
