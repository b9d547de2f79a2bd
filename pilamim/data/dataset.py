"""A torch ``Dataset`` over one split of a prepared data set.

Indexing with ``(index, seed)`` makes a sample's augmentation a pure function of that pair:
the transform runs under a forked, freshly seeded RNG state. That is what makes resuming
mid-epoch exact and lets N DDP ranks produce the same samples as one process, whatever the
worker count or order; the caller's global RNG streams are left untouched.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pilamim.data.bit_depth import to_8bit
from pilamim.data.prepared import PreparedDataset
from pilamim.data.shard_reader import ShardReader
from pilamim.data.transforms import to_normalized_tensor

CACHE_MAX_IMAGES = 50_000
_MASK64 = (1 << 64) - 1


def augmentation_seed(index: int, seed: int) -> int:
    """Mix ``(index, seed)`` into one 63-bit seed (splitmix64 finaliser).

    Mixing the index in means a caller may pass the same seed (e.g. one per epoch) for every
    sample and still get independent augmentations per sample.
    """
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(index) + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class ManifestDataset(Dataset):
    """Images of one split as ``(float32 CxHxW normalised tensor, label index)``.

    The bytes come from the split's shards (:class:`~pilamim.data.shard_reader.ShardReader`),
    the labels from the manifest. Images are decoded lazily on first use and, when ``cache``
    is true (default: when the split has at most ``CACHE_MAX_IMAGES`` images), kept decoded in
    memory. Grayscale data sets
    (``channels == 1``) load as ``'L'``, everything else as ``'RGB'``. ``transform`` maps a PIL
    image to a tensor; by default it only converts and normalises with the data set's mean/std.
    """

    def __init__(
        self,
        prepared: PreparedDataset,
        split: str,
        transform: Callable[[Any], torch.Tensor] | None = None,
        cache: bool | None = None,
    ) -> None:
        records = prepared.split(split)
        self.split = split
        self.digest = prepared.digest
        self.channels = prepared.channels
        self.mode = "L" if prepared.channels == 1 else "RGB"
        self.shards = ShardReader(prepared, split)
        if len(self.shards) != len(records):
            raise ValueError(f"{split}: the shards hold {len(self.shards)} images, the manifest "
                             f"{len(records)}; run `pilamim prepare` again")
        self.labels = [prepared.label_index(r) for r in records]
        self.classes = list(prepared.classes)
        self.transform = transform or to_normalized_tensor(prepared.mean, prepared.std)
        self.cache = len(records) <= CACHE_MAX_IMAGES if cache is None else cache
        self._images: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def load_image(self, index: int):
        """The decoded PIL image at ``index`` (cached if caching is on)."""
        image = self._images.get(index)
        if image is None:
            from PIL import Image

            with Image.open(io.BytesIO(self.shards.read(index))) as raw:
                image = to_8bit(raw, self.mode)  # a loaded copy; 16-bit scaled, not clipped
            if self.cache:
                self._images[index] = image
        return image

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            index, seed = key
            image = self.load_image(index)
            with torch.random.fork_rng(devices=[]), _python_numpy_rng_forked():
                mixed = augmentation_seed(index, seed)
                torch.manual_seed(mixed)
                random.seed(mixed)
                np.random.seed(mixed % (1 << 32))
                tensor = self.transform(image)
        else:
            index = key
            tensor = self.transform(self.load_image(index))
        return tensor, self.labels[index]


@contextmanager
def _python_numpy_rng_forked() -> Iterator[None]:
    """Restore Python's and NumPy's global RNG state on exit (some timm transforms use them)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
