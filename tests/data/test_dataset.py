"""ManifestDataset and transforms: shapes, labels, channels, seeded augmentation."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from pilamim.config import DataParams
from pilamim.data.dataset import ManifestDataset, augmentation_seed
from pilamim.data.prepare import DEFAULT_IMG_SIZE, prepare
from pilamim.data.prepared import PreparedDataset
from pilamim.data.transforms import eval_transform, pretrain_transform, to_normalized_tensor
from tests.data.helpers import make_tree


def _prepared(tmp_path: Path, mode: str) -> PreparedDataset:
    root = make_tree(tmp_path / f"imgs-{mode}", {"ant": 5, "bee": 5}, mode=mode, size=(20, 24))
    return prepare(DataParams(source=str(root), out_dir=str(tmp_path / f"out-{mode}"),
                              raw_dir=str(tmp_path / f"raw-{mode}")))


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGB", 3)])
def test_items_have_the_right_shape_and_label(tmp_path: Path, mode: str, channels: int) -> None:
    prepared = _prepared(tmp_path, mode)
    assert prepared.channels == channels
    ds = ManifestDataset(prepared, "train")
    records = prepared.split("train")
    assert len(ds) == len(records) == 6
    for i, record in enumerate(records):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (channels, 20, 24)
        assert y == prepared.classes.index(record.label) and isinstance(y, int)
    # Normalised with the train statistics, which are measured on the images resized to the
    # model's size: there, roughly zero mean and unit std over the split.
    side = (DEFAULT_IMG_SIZE, DEFAULT_IMG_SIZE)
    seen = ManifestDataset(prepared, "train", T.Compose([
        T.Resize(side, interpolation=T.InterpolationMode.BICUBIC),
        to_normalized_tensor(prepared.mean, prepared.std)]))
    stacked = torch.stack([seen[i][0] for i in range(len(seen))])
    assert abs(stacked.mean().item()) < 1e-3
    assert abs(stacked.std().item() - 1) < 1e-2


def test_eval_transform_sizes(tmp_path: Path) -> None:
    prepared = _prepared(tmp_path, "RGB")
    small = ManifestDataset(prepared, "test", eval_transform(16, prepared.mean, prepared.std))
    assert small[0][0].shape == (3, 16, 16)
    big = eval_transform(64, prepared.mean, prepared.std)
    assert big.transforms[0].size == 73  # 64 / 0.875, then centre crop
    assert ManifestDataset(prepared, "test", big)[0][0].shape == (3, 64, 64)


def test_seeded_key_fixes_augmentation_and_spares_global_rng(tmp_path: Path) -> None:
    prepared = _prepared(tmp_path, "L")
    ds = ManifestDataset(prepared, "train", pretrain_transform(16, prepared.mean, prepared.std))
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    np_state = np.random.get_state()

    a, label = ds[(2, 7)]
    b, _ = ds[(2, 7)]
    c, _ = ds[(2, 8)]
    d, _ = ds[(3, 7)]
    assert a.shape == (1, 16, 16) and label == ds.labels[2]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    # A fresh dataset object (another worker, another rank, a resumed run) agrees.
    again = ManifestDataset(prepared, "train",
                            pretrain_transform(16, prepared.mean, prepared.std), cache=False)
    assert torch.equal(again[(2, 7)][0], a)


def test_augmentation_seed_mixes_index_and_seed() -> None:
    seeds = {augmentation_seed(i, s) for i in range(50) for s in range(50)}
    assert len(seeds) == 2500
    assert all(0 <= s < 2**63 for s in seeds)


def test_cache_keeps_decoded_images_only_when_on(tmp_path: Path) -> None:
    prepared = _prepared(tmp_path, "L")
    cached = ManifestDataset(prepared, "train")
    uncached = ManifestDataset(prepared, "train", cache=False)
    cached[0], uncached[0]
    assert cached.cache and len(cached._images) == 1
    assert not uncached.cache and not uncached._images
    assert cached.load_image(0).mode == "L"
