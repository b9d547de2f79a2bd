"""prepare(): mean/std over images as the model sees them, bounded decoding, 16-bit images,
decompression bombs and empty class folders."""

from __future__ import annotations

import json
import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pilamim.config import DataParams
from pilamim.data.errors import DataError
from pilamim.data.prepare import prepare
from tests.data.helpers import huge_blank_png, make_tree


def _params(root: Path, tmp_path: Path, **changes) -> DataParams:
    return DataParams(source=str(root), raw_dir=str(tmp_path / "raw"),
                      out_dir=str(tmp_path / "out"), **changes)


def _seen_by_model(path: Path, size: int) -> np.ndarray:
    """The image resized to ``size`` x ``size`` (bicubic), as RandomResizedCrop at full frame."""
    with Image.open(path) as img:
        small = img.convert("L").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(small, dtype=np.float64) / 255


def test_one_huge_image_counts_as_much_as_any_other(tmp_path: Path) -> None:
    """A 1200x1200 flat image among 8x8 noisy ones used to set std about 50x too small."""
    root = make_tree(tmp_path / "imgs", {"a": 5, "b": 5}, size=(8, 8))
    Image.new("L", (1200, 1200), 128).save(root / "a" / "huge.png")
    prepared = prepare(_params(root, tmp_path, test_fraction=0.01), img_size=8)
    train = prepared.split("train")
    assert "a/huge.png" in {r.path for r in train}
    pixels = np.concatenate([_seen_by_model(root / r.path, 8).ravel() for r in train])
    np.testing.assert_allclose(prepared.mean, [pixels.mean()], atol=1e-6)
    np.testing.assert_allclose(prepared.std, [pixels.std()], atol=1e-6)
    assert prepared.std[0] > 0.2  # the noisy images still count
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["stats_img_size"] == 8


def test_big_images_never_become_big_float_arrays(tmp_path: Path) -> None:
    """A 2500x2500 image used to take 50 MB of float64 per copy (and two copies)."""
    root = make_tree(tmp_path / "imgs", {"a": 3, "b": 3}, size=(8, 8))
    ramp = np.tile(np.arange(2500, dtype=np.uint16) % 256, (2500, 1)).astype(np.uint8)
    Image.fromarray(ramp).save(root / "a" / "big.png")
    Image.fromarray(ramp).convert("RGB").save(root / "b" / "big.jpg", quality=90)
    params = _params(root, tmp_path, test_fraction=0.01)
    prepare(params)  # materialise first: only decoding is measured below
    tracemalloc.start()
    try:
        prepared = prepare(params, fetch=False, img_size=16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert {"a/big.png", "b/big.jpg"} <= {r.path for r in prepared.records}
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB of Python/numpy memory"


def _sixteen_bit_tree(root: Path, mode: str, suffix: str, seed: int) -> dict[str, np.ndarray]:
    """Two classes of 8x8 images stored in 16 bits (``level * 257``); the 8-bit pictures they
    hold, by relative path."""
    rng = np.random.default_rng(seed)
    levels = {}
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            level = rng.integers(0, 256, (8, 8)).astype(np.uint8)  # the 8-bit picture ...
            wide = (level.astype(np.uint32) * 257).astype(">u2" if mode == "I;16B" else "<u2")
            raw = wide.astype("<i4") if mode == "I" else wide         # ... in 16 bits
            Image.frombytes(mode, (8, 8), raw.tobytes()).save(root / name / f"{i}{suffix}")
            levels[f"{name}/{i}{suffix}"] = level
    return levels


@pytest.mark.parametrize(("mode", "suffix"), [("I;16", ".png"), ("I;16B", ".tif"),
                                              ("I", ".tif")])
def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path: Path, mode: str,
                                                        suffix: str) -> None:
    root = tmp_path / "imgs"
    levels = _sixteen_bit_tree(root, mode, suffix, seed=0)
    with Image.open(root / "a" / f"0{suffix}") as img:
        assert img.mode == mode
    prepared = prepare(_params(root, tmp_path), img_size=8)
    train = np.concatenate([levels[r.path].ravel() for r in prepared.split("train")]) / 255
    np.testing.assert_allclose(prepared.mean, [train.mean()], atol=1e-6)
    np.testing.assert_allclose(prepared.std, [train.std()], atol=1e-6)


def test_decompression_bomb_is_skipped_or_refused(tmp_path: Path) -> None:
    """90 megapixels in an 87 kB file: over PIL's limit, where PIL itself only warns."""
    root = make_tree(tmp_path / "imgs", {"a": 3, "b": 3}, size=(8, 8))
    huge_blank_png(root / "a" / "bomb.png", 10_000, 9_000)
    prepared = prepare(_params(root, tmp_path))
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    [entry] = info["skipped"]
    assert entry["path"] == "a/bomb.png"
    assert "90,000,000 pixels" in entry["reason"] and "decompression bomb" in entry["reason"]
    assert "a/bomb.png" not in {r.path for r in prepared.records}

    before = (tmp_path / "out" / "dataset.json").read_bytes()
    with pytest.raises(DataError, match="a/bomb.png: DecompressionBombError"):
        prepare(_params(root, tmp_path, bad_images="fail"))
    assert (tmp_path / "out" / "dataset.json").read_bytes() == before


def test_empty_class_folder_is_reported(tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    root = make_tree(tmp_path / "imgs", {"a": 3, "b": 3})
    (root / "c").mkdir()
    (root / "d" / "nested").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        prepared = prepare(_params(root, tmp_path))
    assert prepared.classes == ["a", "b"]
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["empty_classes"] == ["c", "d"]
    assert "c, d" in caplog.text


def test_empty_class_folder_fails_the_run_with_bad_images_fail(tmp_path: Path) -> None:
    """Strict mode: a class that silently vanished would change the model's class count."""
    root = make_tree(tmp_path / "imgs", {"a": 3, "b": 3})
    (root / "c").mkdir()
    with pytest.raises(DataError, match=r"1 class folder\(s\) without usable images") as err:
        prepare(_params(root, tmp_path, bad_images="fail"))
    assert str(err.value).splitlines()[0].endswith(": c")
    assert "set data.bad_images: skip" in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("mode", "suffix"), [("I;16", ".png"), ("I;16B", ".tif")])
def test_loaders_scale_16_bit_images_as_the_statistics_do(tmp_path: Path, mode: str,
                                                          suffix: str) -> None:
    """Training must see the picture mean/std were measured on, not a clipped white one: the
    PIL loader and torchvision's decoder (uint16 for 16-bit PNGs) both keep the high byte."""
    from torchvision.io import decode_image

    from pilamim.data.bit_depth import tensor_to_8bit
    from pilamim.data.dataset import ManifestDataset

    root = tmp_path / "imgs"
    levels = _sixteen_bit_tree(root, mode, suffix, seed=1)
    prepared = prepare(_params(root, tmp_path), img_size=8)
    loader = ManifestDataset(prepared, "train")
    for index, record in enumerate(prepared.split("train")):
        np.testing.assert_array_equal(np.asarray(loader.load_image(index)), levels[record.path])
        if suffix == ".png":
            raw = torch.frombuffer(bytearray((root / record.path).read_bytes()), dtype=torch.uint8)
            decoded = tensor_to_8bit(decode_image(raw))
            np.testing.assert_array_equal(decoded[0].numpy(), levels[record.path])
