"""Shards in S3: written once under a content-addressed prefix, read through a bounded node cache.

``prepare`` with ``data.shards_uri: s3://bucket/prefix`` uploads the finished shards to
``<prefix>/<digest>/<split>/`` and keeps only ``manifest.csv`` and ``dataset.json`` locally.
The prefix is named by the data digest, so it is never overwritten with other bytes: DVC versions
the two small files (O(1) entries, whatever the set's size), and ``dvc repro`` at an old commit
reads exactly the old shards. The ETag of every uploaded shard is recorded, and a stage checks
them all (one HEAD each) before it reads: a shard missing from S3 or changed after ``prepare``
fails at the start, never mixed in.

Readers go through litdata's ``StreamingDataset``: a chunk is downloaded whole into the node's
cache (``PILAMIM_SHARD_CACHE_DIR``, shared by the ranks and loader workers of a node) the first
time an image in it is read. Random access needs the split in the cache, so a split larger than
the cache limit (``PILAMIM_SHARD_CACHE_GB``) is refused at the start with the numbers, rather
than thrashing; no node ever downloads more than its limit.
"""

from __future__ import annotations

import os
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

    bucket, prefix = _bucket_and_prefix(location)
    client = _client()
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
                 wanted: tuple[str, ...]) -> None:
    """Refuse to start on a shard missing from S3 or changed since ``prepare`` uploaded it, or
    on a split the node cache cannot hold."""
    bucket, prefix = _bucket_and_prefix(location)
    found = {o["Key"]: o for o in _list(_client(), bucket, prefix)}
    limit = cache_limit_bytes()
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
        total = sum(c["bytes"] for c in chunks)
        if total > limit:
            largest = max(c["bytes"] for c in chunks)
            raise DataError(
                f"the {split} shards in {location} take {total / 2**30:.2f} GB, over this node's "
                f"shard cache limit of {limit / 2**30:.2f} GB ({CACHE_GB_ENV}; largest shard "
                f"{largest / 2**20:.1f} MB): raise {CACHE_GB_ENV} (with room in "
                f"{CACHE_DIR_ENV}={cache_dir()}), or train from local shards")


def open_dataset(location: str, split: str) -> Any:
    """litdata's dataset over one split in S3, downloading whole chunks into the node cache."""
    from litdata import StreamingDataset

    _allow_plain_http_endpoints()
    dataset = StreamingDataset(split_uri(location, split), cache_dir=str(cache_dir()))
    # Whole chunks into the cache, not one ranged GET per image (litdata's default for
    # random access): the cache check above bounds what that can take.
    dataset._on_demand_bytes = False
    return dataset


def _allow_plain_http_endpoints() -> None:
    """litdata 0.2.76 downloads through obstore, whose client refuses plain-http endpoints
    unless told (its ``allow_http`` option, which litdata never sets): an S3 server on
    loopback or inside a private network then fails with "builder error". Set it only when the
    configured endpoint is http."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    if endpoint.startswith("http://"):
        import litdata.streaming.downloader as downloader

        downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = "true"


def _bucket_and_prefix(location: str) -> tuple[str, str]:
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def _client():
    import boto3

    return boto3.session.Session().client("s3")


def _list(client, bucket: str, prefix: str):
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                 Prefix=f"{prefix}/"):
        yield from page.get("Contents", [])
