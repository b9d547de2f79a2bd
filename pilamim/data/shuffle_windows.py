"""A shuffle that reads a split a few shards at a time, for a split larger than the node's
shard cache (:mod:`pilamim.data.node_cache`).

Here, not in :mod:`pilamim.train.sampler`, because fine-tuning uses it too, and importing the
training package would make the fine-tune stage depend on the pretraining loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def windowed_order(chunk_items: Sequence[int], window: int,
                   generator: torch.Generator) -> torch.Tensor:
    """A shuffle that reads ``window`` shards at a time: the shards (contiguous index ranges of
    ``chunk_items[i]`` items, in order) in a random order, cut into consecutive windows of
    ``window`` shards, each window's items shuffled among themselves.

    Why: random access over a whole split needs all its shards in the node cache; this order
    needs only the window being read and the next one. Every sample is still seen once per
    epoch, but a batch only mixes the images of ``window`` shards, so the shards must have been
    written in a shuffled order (``data.shard_order: shuffled``; :func:`pilamim.data.
    shard_reader.verify_shards` refuses others). The order draws only from ``generator``.
    """
    if window < 1:
        raise ValueError(f"a shuffle window needs at least 1 shard, got {window}")
    counts = torch.as_tensor(list(chunk_items), dtype=torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    chunk_order = torch.randperm(len(counts), generator=generator)
    parts = [torch.empty(0, dtype=torch.int64)]
    for first in range(0, len(counts), window):
        items = torch.cat([torch.arange(int(starts[c]), int(starts[c] + counts[c]))
                           for c in chunk_order[first:first + window].tolist()])
        parts.append(items[torch.randperm(len(items), generator=generator)])
    return torch.cat(parts)


class WindowedShuffle(Sampler[int]):
    """``RandomSampler`` for a split read in windows of shards: a fresh :func:`windowed_order`
    each epoch, drawn from ``generator`` as ``RandomSampler`` draws its permutation."""

    def __init__(self, chunks: Sequence[int], window: int, generator: torch.Generator) -> None:
        self.chunks, self.window, self.generator = list(chunks), window, generator

    def __iter__(self) -> Iterator[int]:
        yield from windowed_order(self.chunks, self.window, self.generator).tolist()

    def __len__(self) -> int:
        return sum(self.chunks)
