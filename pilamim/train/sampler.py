"""A resumable, rank-aware sampler whose samples carry their own augmentation seed.

Each yielded key is ``(index, seed)`` with the seed a function of (run seed, epoch, index) only.
So the augmentation a sample gets does not depend on which worker or rank loads it, which makes
a mid-epoch resume and a 2-process DDP run reproduce a 1-process run exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def sample_seed(run_seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence((run_seed, epoch, index)).generate_state(1, np.uint64)[0]
               % (2**63))


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffles with ``seed + epoch``, deals rank r every world-th index (like
    ``DistributedSampler``), and can start part-way through an epoch."""

    def __init__(self, size: int, world: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.size, self.world, self.rank = size, world, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Start ``epoch`` after skipping this rank's first ``start`` samples."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        usable = self.size - self.size % self.world
        return order[:usable][self.rank::self.world].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._indices()[self.start:]:
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return max(0, self.size // self.world - self.start)
