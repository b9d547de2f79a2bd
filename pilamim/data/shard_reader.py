"""Random access to one split's images in its shards, through litdata's ``StreamingDataset``.

Random access, not litdata's own iteration order: the samplers (:mod:`pilamim.train.sampler`)
already give every sample its own augmentation seed and resume mid-epoch exactly, the same on
1 or N ranks and with any number of loader workers; the shards only change where the bytes
come from. litdata finds the chunk that holds an index and reads the item from it.

Shards in S3 (``data.shards_uri``) are read the same way, from the node's shard cache
(:mod:`pilamim.data.node_cache`), which downloads a chunk whole when a read first needs it
and evicts the least recently used. Before a stage reads, :func:`verify_shards` checks every
chunk against the sizes and sha256 (S3: ETags) that ``prepare`` recorded, so a truncated,
changed or missing shard fails at the start with its name and the fix, and is never silently
mixed in; for S3 it also checks that the cache can serve the stage's reads.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Mapping
from itertools import accumulate
from pathlib import Path
from typing import Any

from pilamim.data.errors import DataError
from pilamim.data.node_cache import NodeCache
from pilamim.data.prepared import SHARDS_DIR, PreparedDataset
from pilamim.data.remote_shards import check_remote
from pilamim.io import file_sha256

REBUILD = ("rebuild it with `pilamim prepare` (or restore the recorded version with "
           "`dvc checkout data/prepared`, or `dvc pull`)")


class ShardReader:
    """``read(i)``: the file bytes of the split's ``i``-th image (manifest order).

    ``chunk_items``: how many images each shard holds; shard ``c`` holds the next
    ``chunk_items[c]`` indices (what a shuffle in windows of shards needs)."""

    def __init__(self, prepared: PreparedDataset, split: str) -> None:
        info = prepared.shards.get(split) or {"items": 0, "chunks": []}
        self.split = split
        self.remote = prepared.location
        self.location = str(_split_dir(prepared, split)) if not self.remote else ""
        self.length = int(info["items"])
        self.chunk_items = [int(c["items"]) for c in info["chunks"]]
        self._ends = list(accumulate(self.chunk_items))
        self._cache = (NodeCache(self.remote, prepared.digest, split, info["chunks"])
                       if self.remote else None)
        self._dataset: Any = None  # opened in the process that reads (loader workers too)
        self._pid = 0  # ... and opened again in a forked one: no file offset shared with it
        self._chunk = -1  # the shard the last read was in (S3: known to be in the cache)

    def __len__(self) -> int:
        return self.length

    def read(self, index: int) -> bytes:
        return self.item(index)["image"]

    def item(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"{self.split} has {self.length} images; no index {index}")
        if self._dataset is None or self._pid != os.getpid():
            if self._cache is not None:
                self._dataset = self._cache.dataset()
            else:
                from litdata import StreamingDataset

                self._dataset = StreamingDataset(self.location)
            self._pid, self._chunk = os.getpid(), -1
        if self._cache is None:
            return self._dataset[index]
        return self._cached_item(index)

    def _cached_item(self, index: int) -> dict[str, Any]:
        """Read from the node cache, downloading the shard first if it is not there. Another
        reader may evict it between that and litdata opening it: then download it again."""
        assert self._cache is not None
        chunk, retries = bisect_right(self._ends, index), 2
        while True:
            if chunk != self._chunk:  # the same shard: litdata reads its open file
                self._cache.ensure(chunk)
                self._chunk = chunk
            try:
                return self._dataset[index]
            except FileNotFoundError:  # litdata: the file went away before it opened it
                self._chunk = -1
                if not retries:
                    raise
                retries -= 1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None, "_pid": 0}


def verify_shards(prepared: PreparedDataset, splits: tuple[str, ...] = ("train", "val", "test"),
                  shuffled: Mapping[str, int | None] | None = None,
                  window_setting: str | None = None) -> None:
    """Refuse to start on a shard that is missing, truncated or changed since ``prepare``.

    Shards in S3 are also checked against the node cache's limit for how the stage reads them
    (:func:`pilamim.data.remote_shards.check_remote`): ``shuffled`` maps each split the stage
    shuffles to its window in shards (None: the whole split; ``window_setting`` names the
    parameter, for the message), every other split is read in order."""
    _refuse_windows_over_sorted_shards(prepared, shuffled or {}, window_setting)
    if prepared.location:
        check_remote(prepared.location, prepared.shards, prepared.etags, splits, shuffled,
                     window_setting)
        return
    for split in splits:
        info = prepared.shards.get(split)
        if not info or not info["chunks"]:
            continue
        folder = _split_dir(prepared, split)
        for chunk in info["chunks"]:
            path = folder / chunk["file"]
            if not path.is_file():
                raise DataError(f"shard {path} is missing; {REBUILD}")
            size = path.stat().st_size
            if size != chunk["bytes"]:
                raise DataError(f"shard {path} has {size} bytes, prepare wrote {chunk['bytes']} "
                                f"(truncated or changed); {REBUILD}")
            if file_sha256(path) != chunk["sha256"]:
                raise DataError(f"shard {path} changed since prepare (sha256 differs); {REBUILD}")


def _refuse_windows_over_sorted_shards(prepared: PreparedDataset,
                                       shuffled: Mapping[str, int | None],
                                       window_setting: str | None) -> None:
    """A window of shards written in path order holds the images of a few classes only, so
    every batch would too: windows need shards whose images were shuffled when written."""
    windowed = [split for split, window in shuffled.items() if window is not None]
    if windowed and prepared.shard_order != "shuffled":
        raise DataError(
            f"{window_setting or 'shuffle_window_chunks'} shuffles within windows of shards, but "
            f"the shards of {prepared.shards_location} hold their images in path order, so a "
            "window would hold a few classes only; set data.shard_order: shuffled and run "
            "`pilamim prepare` again (or set the window to null to shuffle the whole split)")


def _split_dir(prepared: PreparedDataset, split: str) -> Path:
    if prepared.out_dir is None:
        raise ValueError("a PreparedDataset without out_dir has no shards")
    return prepared.out_dir / SHARDS_DIR / split
