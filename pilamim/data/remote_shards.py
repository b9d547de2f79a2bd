"""Shards in S3: written once under a content-addressed prefix, read through a bounded node cache.

``prepare`` with ``data.shards_uri: s3://bucket/prefix`` uploads the finished shards to
``<prefix>/<digest>/<split>/`` and keeps only ``manifest.csv`` and ``dataset.json`` locally.
The prefix is named by the data digest, so it is never overwritten with other bytes: DVC versions
the two small files (O(1) entries, whatever the set's size), and ``dvc repro`` at an old commit
reads exactly the old shards. The ETag of every uploaded shard is recorded, and a stage checks
them all (one HEAD each) before it reads: a shard missing from S3 or changed after ``prepare``
fails at the start, never mixed in.

Readers go through litdata's ``StreamingDataset`` over the node's cache
(``PILAMIM_SHARD_CACHE_DIR``, shared by the ranks and loader workers of a node): a chunk is
downloaded whole the first time an image in it is read, and the least recently used chunks are
evicted so the cache never holds more than ``PILAMIM_SHARD_CACHE_GB``
(:mod:`pilamim.data.node_cache`). What a reader needs at once is checked at the start
(:func:`check_remote`): a whole-split shuffle needs the whole split, a shuffle in windows of
shards two windows, a read in order two shards. A split over that is refused with the numbers
and the fix, rather than downloaded again and again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pilamim.data.errors import DataError

CACHE_DIR_ENV = "PILAMIM_SHARD_CACHE_DIR"
CACHE_GB_ENV = "PILAMIM_SHARD_CACHE_GB"
DEFAULT_CACHE_GB = 200.0
REBUILD_REMOTE = "run `pilamim prepare` again to rewrite it"


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pilamim-shards"
    return Path(os.environ.get(CACHE_DIR_ENV) or default).expanduser()


def cache_limit_bytes() -> int:
    raw = os.environ.get(CACHE_GB_ENV) or str(DEFAULT_CACHE_GB)
    try:
        limit = float(raw)
    except ValueError as err:
        raise DataError(f"{CACHE_GB_ENV}={raw!r} is not a number of GB") from err
    if limit <= 0:
        raise DataError(f"{CACHE_GB_ENV}={raw!r} must be > 0")
    return int(limit * 2**30)


def split_uri(location: str, split: str) -> str:
    return f"{location.rstrip('/')}/{split}"


def upload(local_shards: Path, location: str) -> dict[str, str]:
    """Upload every split folder under ``local_shards`` to ``location``; return the ETag of
    each shard (``"<split>/<file>"``). Objects already there with the same size are kept (a
    rerun after a kill uploads only what is missing: under a digest-named prefix, same name
    and size means the same bytes unless someone changed them, which the ETag check catches)."""
    from boto3.s3.transfer import TransferConfig

    bucket, prefix = bucket_and_prefix(location)
    client = s3_client()
    existing = {o["Key"]: o for o in _list(client, bucket, prefix)}
    config = TransferConfig(multipart_threshold=2**40)  # one PUT per shard: ETag = its md5
    etags: dict[str, str] = {}
    for path in sorted(local_shards.glob("*/*")):
        name = f"{path.parent.name}/{path.name}"
        key = f"{prefix}/{name}"
        known = existing.get(key)
        if known is None or int(known["Size"]) != path.stat().st_size:
            client.upload_file(str(path), bucket, key, Config=config)
            known = client.head_object(Bucket=bucket, Key=key)
            known = {"ETag": known["ETag"], "Size": known["ContentLength"]}
        if path.suffix == ".bin":
            etags[name] = known["ETag"].strip('"')
    return etags


def check_remote(location: str, splits: dict[str, Any], etags: dict[str, str],
                 wanted: tuple[str, ...], shuffled: Mapping[str, int | None] | None = None,
                 window_setting: str | None = None) -> None:
    """Refuse to start on a shard missing from S3 or changed since ``prepare`` uploaded it, or
    on a split the node cache cannot serve as it will be read.

    ``shuffled`` maps each split read in a shuffled order to its window in shards (None: the
    whole split); the other splits are read in order. ``window_setting`` names the parameter
    that sets the window, for the message."""
    bucket, prefix = bucket_and_prefix(location)
    found = {o["Key"]: o for o in _list(s3_client(), bucket, prefix)}
    for split in wanted:
        chunks = (splits.get(split) or {}).get("chunks", [])
        for chunk in chunks:
            name = f"{split}/{chunk['file']}"
            uri = f"{location.rstrip('/')}/{name}"
            obj = found.get(f"{prefix}/{name}")
            if obj is None:
                raise DataError(f"shard {uri} is missing from S3; {REBUILD_REMOTE}")
            if int(obj["Size"]) != chunk["bytes"] or obj["ETag"].strip('"') != etags.get(name):
                raise DataError(f"shard {uri} changed since prepare uploaded it (size or ETag "
                                f"differs); {REBUILD_REMOTE}")
        if chunks:
            _check_fits(location, split, [int(c["bytes"]) for c in chunks],
                        shuffled or {}, window_setting)


def _check_fits(location: str, split: str, sizes: list[int],
                shuffled: Mapping[str, int | None], window_setting: str | None) -> None:
    """What one reader needs in the cache at once, against the node's limit.

    - a shuffle over the whole split reads any shard at any time: the whole split;
    - a shuffle in windows of W shards (:func:`pilamim.data.shuffle_windows.windowed_order`): two
      windows of the largest shards, the one being read and the next, which ranks and loader
      workers start before the last of the previous one is read;
    - a read in order (features, val/test): two shards, the one being read and the next.

    Less than that is not wrong (evicted shards are downloaded again) but rereads the split
    over and over, so it is refused with the numbers. Other readers on the node (another
    stage, the kNN monitor) share the limit; LRU keeps each one's recent shards.
    """
    limit, total, largest = cache_limit_bytes(), sum(sizes), max(sizes)
    where = (f"this node's shard cache limit of {limit / 2**30:.3f} GB ({CACHE_GB_ENV}, in "
             f"{CACHE_DIR_ENV}={cache_dir()})")
    if split in shuffled and shuffled[split] is None:
        if total <= limit:
            return
        window = (f"; or shuffle it in windows of N shards ({window_setting}: N, with 2 x N x "
                  f"{largest / 2**20:.1f} MB within the limit)" if window_setting else "")
        raise DataError(
            f"the {split} shards in {location} take {total / 2**30:.3f} GB, over {where}: a "
            f"shuffle over the whole split needs it all in the cache (largest shard "
            f"{largest / 2**20:.1f} MB). Raise {CACHE_GB_ENV}, or train from local "
            f"shards{window}")
    window_chunks = shuffled.get(split) or 1  # read in order: like a window of one shard
    need = min(total, 2 * window_chunks * largest)
    if need <= limit:
        return
    fits = limit // (2 * largest)
    if split in shuffled:
        lower = (f"lower {window_setting or 'the window'} to {fits} or less, or raise "
                 f"{CACHE_GB_ENV}" if fits else f"raise {CACHE_GB_ENV}")
        raise DataError(
            f"the {split} split of {location} is shuffled in windows of {window_chunks} "
            f"shards; the cache holds two windows (the one being read and the next): 2 x "
            f"{window_chunks} x {largest / 2**20:.1f} MB (largest shard) = "
            f"{need / 2**30:.3f} GB, over {where}: {lower}")
    raise DataError(
        f"reading the {split} shards of {location} in order needs two shards in the cache "
        f"(the one being read and the next): 2 x {largest / 2**20:.1f} MB = "
        f"{need / 2**30:.3f} GB, over {where}: raise {CACHE_GB_ENV}")


def bucket_and_prefix(location: str) -> tuple[str, str]:
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def s3_client() -> Any:
    import boto3

    return boto3.session.Session().client("s3")


def _list(client, bucket: str, prefix: str):
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                 Prefix=f"{prefix}/"):
        yield from page.get("Contents", [])
