"""Shards in S3 (real SeaweedFS on loopback): content-addressed, checked, read through a bounded
node cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pilamim.config import DataParams
from pilamim.data.dataset import ManifestDataset
from pilamim.data.errors import DataError
from pilamim.data.prepare import prepare
from pilamim.data.shard_reader import verify_shards


@pytest.fixture
def remote(embedded: dict, s3_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bucket = f"pilamim-shards-{tmp_path.name[-20:].lower().replace('_', '-')}"
    s3_env.client().create_bucket(Bucket=bucket)
    monkeypatch.setenv("PILAMIM_SHARD_CACHE_DIR", str(tmp_path / "cache"))
    params = DataParams(raw_dir=str(embedded["raw_dir"]), out_dir=str(tmp_path / "p"),
                        max_images_per_class=30, shard_mb=0.02,
                        shards_uri=f"s3://{bucket}/sets")
    return prepare(params), s3_env.client(), bucket


def test_shards_go_to_a_digest_prefix_and_read_back_through_the_cache(remote, tmp_path) -> None:
    prepared, client, bucket = remote
    assert prepared.location == f"s3://{bucket}/sets/{prepared.digest}"
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["dataset.json", "manifest.csv"]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    chunks = prepared.shards["train"]["chunks"]
    assert len(chunks) > 1
    assert {f"sets/{prepared.digest}/train/{c['file']}" for c in chunks} <= keys
    verify_shards(prepared)

    dataset = ManifestDataset(prepared, "train", cache=False)
    records = prepared.split("train")
    for i in range(len(records)):
        assert hashlib.sha256(dataset.shards.read(i)).hexdigest() == records[i].sha256
    cached = sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*.bin"))
    assert cached == sum(c["bytes"] for c in chunks)  # each shard downloaded once, no more


def test_a_missing_or_changed_shard_in_s3_fails_before_reading(remote) -> None:
    prepared, client, bucket = remote
    chunk = prepared.shards["val"]["chunks"][0]["file"]
    key = f"sets/{prepared.digest}/val/{chunk}"
    original = client.get_object(Bucket=bucket, Key=key)["Body"].read()

    client.put_object(Bucket=bucket, Key=key, Body=original[::-1])
    with pytest.raises(DataError, match="changed since prepare") as err:
        verify_shards(prepared)
    assert f"s3://{bucket}/{key}" in str(err.value) and "pilamim prepare" in str(err.value)

    client.delete_object(Bucket=bucket, Key=key)
    with pytest.raises(DataError, match="missing from S3"):
        verify_shards(prepared)


def test_a_cache_smaller_than_the_split_is_refused_at_the_start(
        remote, monkeypatch: pytest.MonkeyPatch) -> None:
    prepared, _, _ = remote
    monkeypatch.setenv("PILAMIM_SHARD_CACHE_GB", str(1000 / 2**30))  # 1,000 bytes
    with pytest.raises(DataError, match="over this node's shard cache limit") as err:
        verify_shards(prepared)
    assert "PILAMIM_SHARD_CACHE_GB" in str(err.value)


def test_loader_workers_forked_after_the_main_process_read_s3_still_download(remote) -> None:
    """The main process reads (the kNN monitor, a figure batch) before a DataLoader forks its
    workers, which then download shards the main process never touched."""
    import multiprocessing

    from torch.utils.data import DataLoader

    prepared, _, _ = remote
    ManifestDataset(prepared, "val", cache=False).shards.read(0)
    train = ManifestDataset(prepared, "train", cache=False)
    loader = DataLoader(train, batch_size=16, num_workers=2,
                        multiprocessing_context=multiprocessing.get_context("fork"),
                        timeout=60)
    assert sum(len(labels) for _, labels in loader) == len(train)
