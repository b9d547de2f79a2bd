"""Random access to one split's images in its shards, through litdata's ``StreamingDataset``.

Random access, not litdata's own iteration order: the samplers (:mod:`pilamim.train.sampler`)
already give every sample its own augmentation seed and resume mid-epoch exactly, the same on
1 or N ranks and with any number of loader workers; the shards only change where the bytes
come from. litdata finds the chunk that holds an index and reads the item from it (memory
mapped locally; from S3 it downloads whole chunks into a bounded per-node cache).

Shards in S3 (``data.shards_uri``) are read the same way, through a node cache
(:mod:`pilamim.data.remote_shards`). Before a stage reads, :func:`verify_shards` checks every
chunk against the sizes and sha256 (S3: ETags) that ``prepare`` recorded, so a truncated,
changed or missing shard fails at the start with its name and the fix, and is never silently
mixed in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pilamim.data.errors import DataError
from pilamim.data.prepared import SHARDS_DIR, PreparedDataset
from pilamim.data.remote_shards import check_remote, open_dataset
from pilamim.io import file_sha256

REBUILD = ("rebuild it with `pilamim prepare` (or restore the recorded version with "
           "`dvc checkout data/prepared`, or `dvc pull`)")


class ShardReader:
    """``read(i)``: the file bytes of the split's ``i``-th image (manifest order)."""

    def __init__(self, prepared: PreparedDataset, split: str) -> None:
        info = prepared.shards.get(split) or {"items": 0, "chunks": []}
        self.split = split
        self.remote = prepared.location
        self.location = str(_split_dir(prepared, split)) if not self.remote else ""
        self.length = int(info["items"])
        self._dataset: Any = None  # opened in the process that reads (loader workers too)

    def __len__(self) -> int:
        return self.length

    def read(self, index: int) -> bytes:
        return self.item(index)["image"]

    def item(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"{self.split} has {self.length} images; no index {index}")
        if self._dataset is None:
            if self.remote:
                self._dataset = open_dataset(self.remote, self.split)
            else:
                from litdata import StreamingDataset

                self._dataset = StreamingDataset(self.location)
        return self._dataset[index]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None}


def verify_shards(prepared: PreparedDataset, splits: tuple[str, ...] = ("train", "val", "test"),
                  ) -> None:
    """Refuse to start on a shard that is missing, truncated or changed since ``prepare``."""
    if prepared.location:
        check_remote(prepared.location, prepared.shards, prepared.etags, splits)
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


def _split_dir(prepared: PreparedDataset, split: str) -> Path:
    if prepared.out_dir is None:
        raise ValueError("a PreparedDataset without out_dir has no shards")
    return prepared.out_dir / SHARDS_DIR / split
