"""A train split larger than the node's shard cache, streamed from S3 (real SeaweedFS on
loopback) with a shuffle in windows of shards: the cache never holds more than its limit, the
weights are those of the same run on local shards, and without a window the split is refused
with the fix."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pilamim.config import DataParams, FinetuneParams, Params
from pilamim.data.dataset import ManifestDataset
from pilamim.data.errors import DataError
from pilamim.data.node_cache import cached_chunk_bytes, make_room
from pilamim.data.prepare import prepare
from pilamim.data.prepared import PreparedDataset, load_prepared
from pilamim.data.shard_reader import ShardReader, verify_shards
from pilamim.stages import finetune as finetune_stage
from pilamim.train import pretrain
from tests.conftest import micro_run_params

SHARD_MB = 0.005  # ~7 KB shards: 20 in train (210 images)
WINDOW = 3


@pytest.fixture(scope="module")
def sets(embedded: dict, seaweedfs, tmp_path_factory) -> tuple[PreparedDataset, PreparedDataset]:
    """The same images prepared twice: shards on local disk, and shards in S3."""
    root = tmp_path_factory.mktemp("windowed")
    bucket = "pilamim-windowed"
    seaweedfs.client().create_bucket(Bucket=bucket)
    with pytest.MonkeyPatch.context() as env:
        for name, value in {**seaweedfs.env(), "AWS_CONFIG_FILE": str(root / "none"),
                            "AWS_SHARED_CREDENTIALS_FILE": str(root / "none")}.items():
            env.setenv(name, value)
        common = dict(raw_dir=str(embedded["raw_dir"]), max_images_per_class=30,
                      shard_mb=SHARD_MB, shard_order="shuffled")
        local = prepare(DataParams(out_dir=str(root / "local"), **common))
        remote = prepare(DataParams(out_dir=str(root / "s3"), shards_uri=f"s3://{bucket}/sets",
                                    **common))
    assert remote.digest == local.digest and remote.location
    return local, remote


def _sizes(prepared: PreparedDataset, split: str) -> list[int]:
    return [c["bytes"] for c in prepared.shards[split]["chunks"]]


@pytest.fixture
def node(sets, s3_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A node cache that holds two windows of the largest shards, but not the train split."""
    _, remote = sets
    sizes = _sizes(remote, "train")
    limit = 2 * WINDOW * max(sizes) + max(sizes) // 2
    assert len(sizes) >= 20 and limit < sum(sizes)
    monkeypatch.setenv("PILAMIM_SHARD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PILAMIM_SHARD_CACHE_GB", repr(limit / 2**30))
    return {"root": tmp_path / "cache", "limit": limit, "largest": max(sizes)}


@contextmanager
def _peak_cache_bytes(root: Path) -> Iterator[list[int]]:
    """Sample what the cache's chunk files take, every 2 ms, while the body runs."""
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], cached_chunk_bytes(root))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield peak
    finally:
        stop.set()
        watcher.join()
    peak[0] = max(peak[0], cached_chunk_bytes(root))


def _weights(workdir: Path) -> dict[str, torch.Tensor]:
    path = workdir / "models" / "pretrain" / "checkpoint.pt"
    return torch.load(path, weights_only=True)["model"]


def test_a_split_over_the_cache_trains_in_windows_within_the_limit_as_on_local_shards(
        sets, node, tmp_path: Path) -> None:
    """Two loader workers and the kNN monitor (train and val, in order) share the node cache
    while the windowed shuffle streams the train split through it."""
    local, remote = sets
    common = dict(epochs=2, shuffle_window_chunks=WINDOW, num_workers=2, knn_every_epochs=1,
                  figure_every_epochs=0)
    pretrain(micro_run_params(tmp_path / "local", str(local.out_dir), **common))
    with _peak_cache_bytes(node["root"]) as peak:
        pretrain(micro_run_params(tmp_path / "s3", str(remote.out_dir), **common))
    assert 0 < peak[0] <= node["limit"]
    cached = list((node["root"] / remote.digest / "train").glob("*.bin"))
    assert 0 < len(cached) < len(_sizes(remote, "train"))  # shards were evicted and read again
    a, b = _weights(tmp_path / "local"), _weights(tmp_path / "s3")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-6, k


def test_without_a_window_the_split_is_refused_with_the_fix(sets, node, tmp_path: Path) -> None:
    _, remote = sets
    with pytest.raises(DataError, match="over this node's shard cache limit") as err:
        pretrain(micro_run_params(tmp_path, str(remote.out_dir)))
    assert "pretrain.shuffle_window_chunks" in str(err.value)
    assert "PILAMIM_SHARD_CACHE_GB" in str(err.value)
    assert not (tmp_path / "models" / "pretrain" / "checkpoint.pt").exists()

    with pytest.raises(DataError, match="two windows") as err:  # 2 x 4 shards do not fit
        pretrain(micro_run_params(tmp_path, str(remote.out_dir), shuffle_window_chunks=4))
    assert f"lower pretrain.shuffle_window_chunks to {WINDOW} or less" in str(err.value)
    assert "PILAMIM_SHARD_CACHE_GB" in str(err.value)
    assert not node["root"].exists() or cached_chunk_bytes(node["root"]) == 0  # read nothing


def test_splits_read_in_order_need_two_shards_of_cache_only(sets, node,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Features and val/test are read in order: any split size streams through a cache of two
    shards, each shard downloaded once, every image's bytes the ones prepare recorded."""
    _, remote = sets
    largest = max(max(_sizes(remote, s)) for s in ("train", "val", "test"))
    monkeypatch.setenv("PILAMIM_SHARD_CACHE_GB", repr(2 * largest / 2**30))
    verify_shards(remote)  # every split read in order
    with pytest.raises(DataError, match="shuffle over the whole split"):
        verify_shards(remote, shuffled={"train": None})
    dataset = ManifestDataset(remote, "train", cache=False)
    peak = 0
    for i, record in enumerate(remote.split("train")):
        assert hashlib.sha256(dataset.shards.read(i)).hexdigest() == record.sha256
        peak = max(peak, cached_chunk_bytes(node["root"]))
    assert 0 < peak <= 2 * largest

    monkeypatch.setenv("PILAMIM_SHARD_CACHE_GB", repr((2 * largest - 1) / 2**30))
    with pytest.raises(DataError, match="needs two shards in the cache"):
        verify_shards(remote)


def test_eviction_takes_the_least_recently_used_chunks_and_killed_downloads(tmp_path) -> None:
    """Any chunk file under the cache counts (other splits, other data versions); a download
    left by a killed process is deleted, other files (index.json, locks) are left."""
    old, mid, new = (tmp_path / "a" / "train" / f"chunk-{i}-0.bin" for i in range(3))
    other = tmp_path / "b" / "val" / "chunk-0-0.bin"
    for i, path in enumerate((old, other, mid, new)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 100)
        os.utime(path, ns=(i * 10**9, i * 10**9))
    leftover = new.with_name(new.name + ".tmp.12345")
    leftover.write_bytes(b"x" * 50)
    (tmp_path / "a" / "train" / "index.json").write_text("{}")
    make_room(tmp_path, 150, 400)  # 400 used: two must go
    assert not old.exists() and not other.exists() and mid.exists() and new.exists()
    assert not leftover.exists() and (tmp_path / "a" / "train" / "index.json").exists()
    assert cached_chunk_bytes(tmp_path) == 200
    with pytest.raises(DataError, match="does not fit"):
        make_room(tmp_path, 500, 400)


def test_fine_tuning_streams_in_windows_too(sets, node, tmp_path: Path) -> None:
    """The fine-tune stage on the S3 split: refused without a window, within the limit with
    one, and the same training loss as on local shards (the same windowed order)."""
    local, remote = sets
    pretrain(micro_run_params(tmp_path / "pre", str(local.out_dir), epochs=1,
                              figure_every_epochs=0, knn_every_epochs=0))

    def finetune(data: PreparedDataset, name: str, window: int | None) -> dict:
        out = tmp_path / name
        p = FinetuneParams(data_dir=str(data.out_dir), encoder_dir=str(tmp_path / "pre/models/"
                                                                       "pretrain"),
                           out_dir=str(out / "model"), metrics_path=str(out / "metrics.json"),
                           plots_path=str(out / "curve.csv"), epochs=1, warmup_epochs=0,
                           batch_size=16, device="cpu", num_workers=2,
                           shuffle_window_chunks=window)
        return finetune_stage.run(Params(finetune=p))

    with pytest.raises(DataError, match="finetune.shuffle_window_chunks"):
        finetune(remote, "refused", None)
    on_local = finetune(local, "local", WINDOW)
    with _peak_cache_bytes(node["root"]) as peak:
        on_s3 = finetune(remote, "s3", WINDOW)
    assert 0 < peak[0] <= node["limit"]
    assert on_s3["train_loss"] == on_local["train_loss"]
    a = load_file(str(tmp_path / "local/model/classifier.safetensors"))
    b = load_file(str(tmp_path / "s3/model/classifier.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shuffled_shards_mix_the_classes_and_keep_the_manifest_in_their_order(sets) -> None:
    """Index i is the manifest's i-th image of the split and the i-th item of its shards;
    each shard holds many classes (in path order it would hold one or two)."""
    local, _ = sets
    reader = ShardReader(local, "train")
    records = local.split("train")
    first = reader.chunk_items[0]
    assert [reader.item(i)["path"] for i in range(len(records))] == [r.path for r in records]
    assert len({records[i].label for i in range(first)}) >= 5


def test_windows_over_shards_in_path_order_are_refused(tiny_prepared) -> None:
    prepared = load_prepared(tiny_prepared)
    assert prepared.shard_order == "path"
    with pytest.raises(DataError, match="data.shard_order: shuffled"):
        verify_shards(prepared, shuffled={"train": 3},
                      window_setting="pretrain.shuffle_window_chunks")
    verify_shards(prepared, shuffled={"train": None})
