"""IDX reader and the bundled subset's provenance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pilamim.data.embedded import SUBSET_PATH
from pilamim.data.idx import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    read_idx,
    stratified_indices,
)
from tests.data.helpers import write_idx

needs_debian_files = pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist",
)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([1, -2, 70000], dtype=np.int32),
    np.array([[0.5, -1.25]], dtype=np.float32),
])
def test_read_idx_round_trips(tmp_path: Path, array: np.ndarray, gz: bool) -> None:
    got = read_idx(write_idx(tmp_path / "a.idx", array, gz=gz))
    assert got.shape == array.shape
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, array)


def test_read_idx_rejects_bad_magic_and_short_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x1f\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = write_idx(tmp_path / "short.idx", np.zeros((4, 4), np.uint8), gz=False)
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(ValueError, match="expected"):
        read_idx(short)


@needs_debian_files
def test_read_idx_reads_fashion_mnist() -> None:
    images = read_idx(DEBIAN_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(DEBIAN_FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


def test_stratified_indices_are_balanced_and_seeded() -> None:
    labels = np.repeat(np.arange(3), [5, 7, 9])
    picked = stratified_indices(labels, 4, seed=0)
    assert np.bincount(labels[picked]).tolist() == [4, 4, 4]
    assert np.all(np.diff(picked) > 0)
    np.testing.assert_array_equal(picked, stratified_indices(labels, 4, seed=0))
    assert not np.array_equal(picked, stratified_indices(labels, 4, seed=1))
    with pytest.raises(ValueError, match="fewer than"):
        stratified_indices(labels, 6, seed=0)


def test_bundled_subset_shape_and_balance() -> None:
    with np.load(SUBSET_PATH) as z:
        assert tuple(z["classes"]) == FASHION_MNIST_CLASSES
        for split, per_class in (("train", 1000), ("test", 200)):
            assert z[f"{split}_images"].shape == (10 * per_class, 28, 28)
            assert z[f"{split}_images"].dtype == np.uint8
            assert np.bincount(z[f"{split}_labels"]).tolist() == [per_class] * 10


@needs_debian_files
def test_bundled_subset_matches_the_official_test_file() -> None:
    images = read_idx(DEBIAN_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(DEBIAN_FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    with np.load(SUBSET_PATH) as z:
        index = z["test_index"]
        np.testing.assert_array_equal(z["test_images"], images[index])
        np.testing.assert_array_equal(z["test_labels"], labels[index])
        np.testing.assert_array_equal(index, stratified_indices(labels, 200, seed=0))
