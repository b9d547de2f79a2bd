"""input_pipeline='device': same crops and flips as the PIL pipeline, pixels close to PIL's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pilamim.data.device_decode import DeviceCropResize
from pilamim.data.prepared import PreparedDataset, Record
from pilamim.data.pretrain_input import pretrain_input
from pilamim.data.shards import ShardOptions, ShardTask, finish_split, write_shard

CPU = torch.device("cpu")
# Mixed sizes and orientations, and every way a file reaches the decoder: JPEG (batched
# decode_jpeg), PNG (torchvision's decode_image), BMP (torchvision cannot: PIL fallback).
FILES = [((64, 48), ".jpg"), ((48, 64), ".jpg"), ((70, 40), ".jpg"), ((56, 56), ".png"),
         ((64, 48), ".bmp"), ((40, 60), ".jpg")]


def _smooth_image(rng: np.random.Generator, size: tuple[int, int], mode: str) -> Image.Image:
    """Gradients and soft blobs: resampling filters then differ by little, as on photos."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    planes = []
    for _ in range(3 if mode == "RGB" else 1):
        a = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0)  # left differs from right: flips show
        b, c = rng.uniform(-1, 1, 2)
        cx, cy = rng.uniform(0, 1, 2)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) * 20)
        planes.append(128 + 60 * (a * x + b * y) + 60 * c * blob)
    array = np.clip(np.stack(planes, -1), 0, 255).astype(np.uint8)
    return Image.fromarray(array if mode == "RGB" else array[..., 0], mode)


class _Folder:
    """The one part of a fetched source that writing a shard uses."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()


def _prepared(root: Path, mode: str) -> PreparedDataset:
    """All six files in one training shard, written the way ``prepare`` writes shards."""
    rng = np.random.default_rng(0)
    items = []
    for i, (size, suffix) in enumerate(FILES):
        rel = f"{'a' if i % 2 else 'b'}/img_{i}{suffix}"
        path = root / "src" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _smooth_image(rng, size, mode).save(path, **({"quality": 95} if suffix == ".jpg" else {}))
        items.append((rel, rel[0]))
    items.sort()
    out = root / "out"
    task = ShardTask("train", 0, tuple(items))
    result = write_shard(_Folder(root / "src"), task, out / "shards" / "train",
                         root / "task.json", ShardOptions(24))
    finish_split(out / "shards" / "train", 1, "test")
    channels = 3 if mode == "RGB" else 1
    return PreparedDataset(classes=["a", "b"], channels=channels,
                           mean=(0.5,) * channels, std=(0.25,) * channels, digest="test",
                           records=[Record(rel, label, "train", "") for rel, label in items],
                           shards={"train": {"items": len(items), "chunks": [result["chunk"]]}},
                           out_dir=out)


def _batch(prepared: PreparedDataset, pipeline: str, hflip: bool = True, seed: int = 3):
    source = pretrain_input(prepared, "train", 24, (0.2, 1.0), hflip, pipeline, CPU, cache=False)
    keys = [(i, seed) for i in range(len(prepared.records))]
    loader = DataLoader(source.dataset, batch_size=len(keys), sampler=keys,
                        collate_fn=source.collate_fn)
    return source.to_device(next(iter(loader)))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_device_pipelines_match_the_pil_pipeline(tmp_path: Path, mode: str) -> None:
    prepared = _prepared(tmp_path, mode)
    pil = _batch(prepared, "pil")
    channels = 3 if mode == "RGB" else 1
    for pipeline in ("device_bicubic", "device"):
        out = _batch(prepared, pipeline)
        assert out.shape == pil.shape == (len(FILES), channels, 24, 24)
        assert out.dtype == torch.float32
        diff = (out - pil).abs()
        # The same crop box and flip per sample: only the resampling filter differs (~0.005
        # here). Another box or a missed flip differs by > 0.05 on these images.
        assert diff.mean(dim=(1, 2, 3)).max() < 0.01, (pipeline, diff.mean(dim=(1, 2, 3)))
    for changed in (dict(seed=4), dict(hflip=False)):
        other = (_batch(prepared, "device", **changed) - _batch(prepared, "device")).abs()
        assert other.mean(dim=(1, 2, 3)).max() > 0.05, changed


def test_no_flip_when_hflip_is_off(tmp_path: Path) -> None:
    prepared = _prepared(tmp_path, "RGB")
    source = pretrain_input(prepared, "train", 24, (0.2, 1.0), False, "device", CPU)
    assert not any(source.dataset[(i, 0)][2] for i in range(len(FILES)))
    diff = (_batch(prepared, "device", hflip=False) - _batch(prepared, "pil", hflip=False)).abs()
    assert diff.mean(dim=(1, 2, 3)).max() < 0.01


def test_canvas_chunks_do_not_change_the_batch(tmp_path: Path) -> None:
    """Images of mixed sizes cropped from one canvas or one canvas each: the same batch."""
    prepared = _prepared(tmp_path, "RGB")
    source = pretrain_input(prepared, "train", 24, (0.2, 1.0), True, "device", CPU)
    raw = source.collate_fn([source.dataset[(i, 0)] for i in range(len(FILES))])
    one = DeviceCropResize(24, 3, prepared.mean, prepared.std, CPU)(raw)
    each = DeviceCropResize(24, 3, prepared.mean, prepared.std, CPU, max_canvas=1)(raw)
    assert torch.equal(one, each)


def test_unknown_pipeline_and_resize_are_refused(tmp_path: Path) -> None:
    prepared = _prepared(tmp_path, "RGB")
    with pytest.raises(ValueError, match="pipeline 'gpu'"):
        pretrain_input(prepared, "train", 24, (0.2, 1.0), True, "gpu", CPU)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resize 'nearest'"):
        DeviceCropResize(24, 3, prepared.mean, prepared.std, CPU, resize="nearest")  # type: ignore[arg-type]
