"""Read IDX files (the MNIST / Fashion-MNIST container format) and pick stratified subsets.

IDX is a tiny format: two zero bytes, a type code, the number of dimensions, one big-endian
uint32 per dimension, then the raw array. We read it with NumPy alone so the bundled data set
can be rebuilt (and the full set used via ``DataParams.embedded_idx_dir``) without torchvision's
downloaders.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

# Fashion-MNIST label index -> class name (filesystem safe: no slash, no spaces).
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
)

# split -> (images file, labels file), as published by Zalando and packaged by Debian.
FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open(path: Path):
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Return the array stored in an IDX file (gzip-compressed or plain, detected by content).

    Multi-byte types are converted to native byte order. A wrong magic number or a short file
    raises ``ValueError`` naming the file, so a corrupt download is caught here, not later.
    """
    path = Path(path)
    with _open(path) as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4]!r})")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: IDX header truncated")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    expected = header + count * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: expected {expected} bytes for shape {shape}, got {len(data)}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def load_fashion_mnist(idx_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read the four Fashion-MNIST IDX files: ``{"train": (images, labels), "test": (...)}``."""
    idx_dir = Path(idx_dir)
    names = ", ".join(name for pair in FASHION_MNIST_FILES.values() for name in pair)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        images_path, labels_path = idx_dir / images_name, idx_dir / labels_name
        for p in (images_path, labels_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p} not found: data.embedded_idx_dir must hold the four Fashion-MNIST "
                    f"gzip IDX files ({names})"
                )
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{idx_dir}: {split} images {images.shape} and labels {labels.shape} do not match"
            )
        out[split] = (images.astype(np.uint8, copy=False), labels.astype(np.uint8, copy=False))
    return out


def stratified_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Pick ``per_class`` indices of every label value, reproducibly; returned sorted.

    Each class draws from its own generator seeded with ``(seed, class)``, so the pick of one
    class does not depend on how many samples the others have.
    """
    chosen = []
    for cls in np.unique(labels):
        pool = np.flatnonzero(labels == cls)
        if len(pool) < per_class:
            raise ValueError(f"class {int(cls)} has {len(pool)} samples, fewer than {per_class}")
        rng = np.random.default_rng([seed, int(cls)])
        chosen.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))
