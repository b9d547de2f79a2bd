"""Rebuild ``fashion_mnist_subset.npz`` from the official Fashion-MNIST IDX files.

Usage::

    python -m pilamim.data.embedded.build_subset [--idx-dir DIR] [--out PATH]

The subset is stratified and seeded: ``TRAIN_PER_CLASS`` images of every class from the
official training file and ``TEST_PER_CLASS`` from the official test file, each class drawn by
its own generator (``numpy.random.default_rng([SEED, class])``), kept in original file order.
The npz also stores each image's index in its source file, so every bundled image traces back
to the original data set. The array contents are reproducible bit for bit; the zip container
itself carries timestamps, so compare arrays, not file hashes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pilamim.data.embedded import SUBSET_PATH
from pilamim.data.idx import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    stratified_indices,
)

TRAIN_PER_CLASS = 1000
TEST_PER_CLASS = 200
SEED = 0


def build_subset(
    idx_dir: str | Path = DEBIAN_FASHION_MNIST_DIR,
    out_path: str | Path = SUBSET_PATH,
    train_per_class: int = TRAIN_PER_CLASS,
    test_per_class: int = TEST_PER_CLASS,
    seed: int = SEED,
) -> Path:
    """Write the stratified subset as a compressed npz and return its path.

    Keys: ``{train,test}_images`` (uint8 N x 28 x 28), ``{train,test}_labels`` (uint8),
    ``{train,test}_index`` (int32 position in the official file), ``classes`` (str).
    """
    data = load_fashion_mnist(idx_dir)
    arrays: dict[str, np.ndarray] = {"classes": np.array(FASHION_MNIST_CLASSES)}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = data[split]
        index = stratified_indices(labels, per_class, seed)
        arrays[f"{split}_images"] = images[index]
        arrays[f"{split}_labels"] = labels[index]
        arrays[f"{split}_index"] = index.astype(np.int32)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out_path)
    return out_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idx-dir", default=str(DEBIAN_FASHION_MNIST_DIR))
    parser.add_argument("--out", default=str(SUBSET_PATH))
    parser.add_argument("--train-per-class", type=int, default=TRAIN_PER_CLASS)
    parser.add_argument("--test-per-class", type=int, default=TEST_PER_CLASS)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    path = build_subset(args.idx_dir, args.out, args.train_per_class, args.test_per_class,
                        args.seed)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
