"""The windowed shuffle (splits larger than the node's shard cache): an epoch order that reads a
few shards at a time, dealt over ranks and resumed exactly like the whole-split shuffle."""

import pytest
import torch

from pilamim.data.shuffle_windows import WindowedShuffle, windowed_order
from pilamim.train.sampler import EpochSampler

CHUNKS = [5, 7, 3, 6, 6, 4, 8, 2, 5]  # items per shard; shard c holds one contiguous range


def _chunk_of(index: int) -> int:
    return next(c for c in range(len(CHUNKS)) if index < sum(CHUNKS[:c + 1]))


def _windows(order: list[int], window: int) -> list[set[int]]:
    """Cut ``order`` into consecutive runs of ``window`` whole shards (the last: what is left);
    fails if an item of another shard comes before a run is complete."""
    windows, seen, taken, left = [], set(), 0, len(CHUNKS)
    for index in order:
        seen.add(_chunk_of(index))
        taken += 1
        assert len(seen) <= min(window, left), "a window mixes more shards than it holds"
        if len(seen) == min(window, left) and taken == sum(CHUNKS[c] for c in seen):
            windows.append(seen)
            left -= len(seen)
            seen, taken = set(), 0
    assert not seen, "the order ended inside a window"
    return windows


@pytest.mark.parametrize("window", [1, 2, 4, 9, 20])
def test_each_window_holds_exactly_its_shards_items_and_all_are_seen_once(window):
    order = windowed_order(CHUNKS, window, torch.Generator().manual_seed(7)).tolist()
    assert sorted(order) == list(range(sum(CHUNKS)))
    windows = _windows(order, window)
    full = min(window, len(CHUNKS))
    assert [len(w) for w in windows[:-1]] == [full] * (len(windows) - 1)
    assert len(windows) == -(-len(CHUNKS) // window)  # the last window takes what is left
    assert set().union(*windows) == set(range(len(CHUNKS)))


def test_the_order_is_a_function_of_seed_epoch_shards_and_window_only():
    def epoch(seed, e, window=3):
        sampler = EpochSampler(sum(CHUNKS), seed=seed, chunks=CHUNKS, window=window)
        sampler.set_epoch(e)
        return [i for i, _ in sampler]

    assert epoch(1, 2) == epoch(1, 2)
    assert epoch(1, 2) != epoch(1, 3) and epoch(1, 2) != epoch(2, 2)
    assert epoch(1, 2) != epoch(1, 2, window=2)
    assert epoch(1, 2) != sorted(epoch(1, 2))  # shuffled inside the windows too


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_deal_the_one_rank_order(world):
    """Rank r takes every world-th sample of the 1-rank order: a global batch of N ranks is
    the 1-rank run's batch, as with the whole-split shuffle."""
    size = sum(CHUNKS)
    single = EpochSampler(size, seed=4, chunks=CHUNKS, window=3)
    single.set_epoch(5)
    one = list(single)
    ranks = []
    for rank in range(world):
        sampler = EpochSampler(size, world, rank, seed=4, chunks=CHUNKS, window=3)
        sampler.set_epoch(5)
        ranks.append(list(sampler))
    usable = size - size % world
    for rank, got in enumerate(ranks):
        assert got == one[:usable][rank::world]  # same indices, same augmentation seeds
        assert len(got) == len(EpochSampler(size, world, rank, chunks=CHUNKS, window=3))


def test_resume_part_way_through_an_epoch_is_exact():
    sampler = EpochSampler(sum(CHUNKS), world=2, rank=1, seed=9, chunks=CHUNKS, window=2)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start=11)
    assert list(sampler) == full[11:]
    assert len(sampler) == len(full) - 11


def test_without_a_window_the_order_is_the_whole_split_permutation_as_before():
    sampler = EpochSampler(23, world=2, rank=0, seed=3, chunks=[10, 13])
    sampler.set_epoch(4)
    expected = torch.randperm(23, generator=torch.Generator().manual_seed(3 + 4))
    assert [i for i, _ in sampler] == expected[:22][0::2].tolist()


def test_shard_counts_must_cover_the_split():
    with pytest.raises(ValueError, match="item count of every shard"):
        EpochSampler(10, chunks=[4, 4], window=1)
    with pytest.raises(ValueError, match="item count of every shard"):
        EpochSampler(10, window=1)


def test_the_fine_tune_sampler_draws_a_new_windowed_order_each_epoch():
    sampler = WindowedShuffle(CHUNKS, 2, torch.Generator().manual_seed(0))
    first, second = list(sampler), list(sampler)
    assert len(sampler) == sum(CHUNKS)
    assert sorted(first) == sorted(second) == list(range(sum(CHUNKS)))
    assert first != second
    assert all(len(w) == 2 for w in _windows(first, 2)[:-1])
