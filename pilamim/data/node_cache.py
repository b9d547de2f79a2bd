"""The node's shard cache: S3 shards downloaded whole on first read, the least recently used
evicted, so the chunk files under ``PILAMIM_SHARD_CACHE_DIR`` never add up to more than
``PILAMIM_SHARD_CACHE_GB``.

litdata reads the cached shards as a plain local folder (``<cache>/<digest>/<split>/``:
``index.json`` plus whichever chunk files are there); this module alone downloads and deletes.
Why not litdata's own S3 cache (0.2.76, read as we read it, random access through
``StreamingDataset.__getitem__``; ``streaming/reader.py``, ``config.py``, ``downloader.py``):

- ``max_cache_size`` bounds one split's folder, not the node, and only softly: its prefetch
  thread deletes after the fact ("~5% overshoot from in-flight downloads is accepted"), and a
  budget under the split's size switches on delete-when-processed, which deletes a chunk when a
  read moves to another one (in a shuffle, about every read) and downloads it again later.
  Unset, it is 75 % of the free disk, so that can happen on a small disk with no setting at all.
- The ``<chunk>.cnt`` reference counts are raised once per download and lowered on every chunk
  switch, so in random access they say nothing about who still reads a chunk.
- Its prefetch thread downloads from a queue that lags the reads: a chunk someone else evicted
  can come back later, outside any lock and any bound.

Here, under one node-wide file lock (``.pilamim-cache.lock``; ranks and loader workers are
separate processes):

- a read that moves to a chunk on disk only sets that file's mtime, the LRU clock (atime is
  often off);
- a missing chunk takes the lock, deletes the chunk files (``*.bin``, any split, any data
  version under the cache dir, old litdata caches included) touched longest ago until it fits,
  then downloads it to ``<file>.tmp.<pid>`` and renames it in. Downloads happen only under the
  lock, so a ``.tmp.`` file found there is a killed download's leftover and is deleted. One
  download at a time per node: boto3 splits each into parallel ranged GETs.
- A chunk deleted under another reader: that reader's memory map of it still reads the same
  bytes (deleting unlinks the file; nothing is ever rewritten in place, so no map sees a
  truncated file), and a reader that opens it later finds it missing and downloads it again
  (:meth:`NodeCache.ensure`): correct, only slower. Linux frees an unlinked file's blocks only
  when its last map closes: litdata keeps at most 4 chunks mapped per reader process, and LRU
  evicts chunks of windows read long ago, which no reader still maps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pilamim.data.errors import DataError
from pilamim.data.remote_shards import (
    CACHE_GB_ENV,
    REBUILD_REMOTE,
    bucket_and_prefix,
    cache_dir,
    cache_limit_bytes,
    s3_client,
    split_uri,
)

LOCK_FILE = ".pilamim-cache.lock"
INDEX_FILE = "index.json"


class NodeCache:
    """One split's shards in the node cache: :meth:`dataset` to read them with litdata,
    :meth:`ensure` before reading chunk ``i`` for the first time."""

    def __init__(self, location: str, digest: str, split: str,
                 chunks: list[dict[str, Any]]) -> None:
        self.root = cache_dir()
        self.folder = self.root / digest / split  # the digest names the bytes: shareable
        self.remote = split_uri(location, split)
        self.chunks = chunks
        self.limit = cache_limit_bytes()
        self._s3: Any = None
        self._s3_pid = 0

    def dataset(self) -> Any:
        """litdata's dataset over the local folder (it never downloads nor deletes there)."""
        from litdata import StreamingDataset

        index = self.folder / INDEX_FILE
        if not index.is_file():
            with self._lock():
                if not index.is_file():
                    self._download(INDEX_FILE, index, None)
        # Read as local shards are: memory-mapped ("POSIX-fast"). litdata's other path reads a
        # whole chunk file each time a read moves to another chunk (3x slower measured on 32 MB
        # chunks, and worse in a shuffle, which moves on about every read).
        return StreamingDataset(str(self.folder))

    def ensure(self, chunk: int) -> None:
        """Chunk ``chunk`` is on disk and the most recently used: downloaded (evicting others)
        if it is not."""
        entry = self.chunks[chunk]
        path = self.folder / entry["file"]
        try:
            os.utime(path)
            return
        except FileNotFoundError:
            pass
        with self._lock():
            if path.is_file():  # another process downloaded it meanwhile
                os.utime(path)
                return
            make_room(self.root, int(entry["bytes"]), self.limit)
            self._download(entry["file"], path, int(entry["bytes"]))

    def _lock(self) -> Any:
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / LOCK_FILE))

    def _download(self, name: str, path: Path, size: int | None) -> None:
        bucket, prefix = bucket_and_prefix(self.remote)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
        try:
            self._client().download_file(bucket, f"{prefix}/{name}", str(tmp))
            got = tmp.stat().st_size
            if size is not None and got != size:
                raise DataError(f"shard {self.remote}/{name} has {got} bytes in S3, prepare "
                                f"uploaded {size} (changed since); {REBUILD_REMOTE}")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _client(self) -> Any:
        """One boto3 client per process: a forked loader worker must not share the parent's
        connections."""
        if self._s3 is None or self._s3_pid != os.getpid():
            self._s3, self._s3_pid = s3_client(), os.getpid()
        return self._s3

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_s3": None, "_s3_pid": 0}


def make_room(root: Path, size: int, limit: int) -> None:
    """Delete the chunk files under ``root`` used longest ago until ``size`` more bytes fit in
    ``limit`` (the caller holds the lock and then adds the file)."""
    if size > limit:
        raise DataError(f"a {size / 2**20:.1f} MB shard does not fit this node's shard cache "
                        f"limit of {limit / 2**30:.3f} GB; raise {CACHE_GB_ENV}")
    chunks: list[tuple[int, int, Path]] = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            try:
                if ".bin.tmp." in name:
                    path.unlink()
                elif name.endswith(".bin"):
                    stat = path.stat()
                    chunks.append((stat.st_mtime_ns, stat.st_size, path))
            except FileNotFoundError:
                continue
    used = sum(c[1] for c in chunks)
    for _, nbytes, path in sorted(chunks):
        if used + size <= limit:
            break
        path.unlink(missing_ok=True)
        used -= nbytes


def cached_chunk_bytes(root: Path) -> int:
    """What the chunk files under ``root`` take now (the number the limit bounds)."""
    total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(".bin"):
                try:
                    total += (Path(folder) / name).stat().st_size
                except FileNotFoundError:
                    continue
    return total
