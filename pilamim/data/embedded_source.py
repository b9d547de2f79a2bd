"""The ``embedded`` source: Fashion-MNIST arrays read as PNG files that are never written.

The bundled subset (``fashion_mnist_subset.npz``) or, with ``embedded_idx_dir``, the full IDX
files hold the pixels already; writing 12,000 (70,000) PNGs under ``raw_dir`` only made DVC
hash that many files. So ``fetch`` records each image's path (``<class>/<split>_<index>.png``,
``index`` its position in the official file) and PNG size, plus the arrays' sha256 fingerprint
(:mod:`pilamim.data.inventory`), and ``read`` encodes the PNG when it is asked for, with
:func:`encode_gray_png`: the same bytes the PNG files held, so prepared data does not change.
The arrays are loaded once per process, after their fingerprint is checked against the fetch's.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from pilamim.data.embedded import SUBSET_PATH
from pilamim.data.errors import DataError
from pilamim.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, load_fashion_mnist
from pilamim.data.inventory import INVENTORY, InventoryFiles, Stamp, read_header, write_inventory
from pilamim.io import file_sha256

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
REFETCH = "run `pilamim fetch` again"

# per split: (images N x 28 x 28, labels N, index in the official file N)
Arrays = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


def encode_gray_png(image: np.ndarray) -> bytes:
    """A 2-D uint8 array as an 8-bit grayscale PNG (what PIL decodes as mode 'L').

    Written by hand because the format is this simple for gray images and it is about five
    times faster than going through PIL, which matters for 70,000 tiny Fashion-MNIST images.
    """
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 array, got {image.dtype} {image.shape}")
    height, width = image.shape
    rows = np.zeros((height, width + 1), dtype=np.uint8)  # filter byte 0 ("None") per row
    rows[:, 1:] = image

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8 bit, gray, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


def fingerprint(idx_dir: Path | None) -> dict[str, Any]:
    """sha256 of the bundled npz, or of the four IDX files in ``idx_dir``."""
    if idx_dir is None:
        if not SUBSET_PATH.is_file():
            raise DataError(f"bundled data set {SUBSET_PATH} is missing; reinstall pilamim")
        return {"kind": "fashion-mnist-subset", "sha256": file_sha256(SUBSET_PATH)}
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    missing = [n for n in names if not (idx_dir / n).is_file()]
    if missing:
        raise DataError(
            f"data.embedded_idx_dir {idx_dir} lacks {', '.join(missing)}; it must hold the four "
            "Fashion-MNIST gzip IDX files (Debian: apt-get install dataset-fashion-mnist -> "
            "/usr/share/datasets/fashion-mnist), or set it to null for the bundled subset."
        )
    return {"kind": "fashion-mnist-idx", "sha256": {n: file_sha256(idx_dir / n) for n in names}}


def fetch_embedded(idx_dir: Path | None, dest: Path) -> None:
    """Write the inventory of the bundled subset (or the IDX files) into ``dest``, unless the
    one there was made from the same arrays."""
    found = fingerprint(idx_dir)
    try:
        _, header = read_header(dest / INVENTORY)
        if header.get("kind") == "embedded" and header.get("fingerprint") == found:
            log.info("%s is up to date", dest / INVENTORY)
            return
    except (FileNotFoundError, DataError):
        pass
    classes, arrays = _load(idx_dir)
    rows = [[_rel(classes, split, label, i), len(encode_gray_png(image))]
            for split, (images, labels, index) in arrays.items()
            for image, label, i in zip(images, labels, index, strict=True)]
    dest.mkdir(parents=True, exist_ok=True)
    write_inventory(dest, {"kind": "embedded", "fingerprint": found, "classes": sorted(classes)},
                    rows)


def _rel(classes: list[str], split: str, label: Any, index: Any) -> str:
    return f"{classes[int(label)]}/{split}_{int(index):05d}.png"


def _load(idx_dir: Path | None) -> tuple[list[str], Arrays]:
    if idx_dir is None:
        with np.load(SUBSET_PATH) as z:
            return [str(c) for c in z["classes"]], {
                s: (z[f"{s}_images"], z[f"{s}_labels"], z[f"{s}_index"]) for s in SPLITS}
    try:
        data = load_fashion_mnist(idx_dir)
    except ValueError as err:
        raise DataError(f"data.embedded_idx_dir {idx_dir}: {err}") from err
    return list(FASHION_MNIST_CLASSES), {
        s: (images, labels, np.arange(len(labels))) for s, (images, labels) in data.items()}


_LOADED: dict[tuple[str, str], tuple[list[str], dict[str, tuple[np.ndarray, dict[int, int]]]]] = {}


def _arrays(idx_dir: Path | None, expected: dict[str, Any]):
    """The classes and, per split, the images and ``official index -> row``: loaded once per
    process, and only when the files are still the ones the fetch fingerprinted."""
    key = (str(idx_dir), repr(expected))
    if key not in _LOADED:
        if fingerprint(idx_dir) != expected:
            where = idx_dir or SUBSET_PATH
            raise DataError(f"{where} changed since `pilamim fetch` fingerprinted it; {REFETCH}")
        classes, arrays = _load(idx_dir)
        _LOADED[key] = classes, {
            s: (images, {int(i): row for row, i in enumerate(index)})
            for s, (images, _, index) in arrays.items()}
    return _LOADED[key]


class EmbeddedFiles(InventoryFiles):
    """The fetched ``embedded`` source: each PNG encoded from the arrays when it is read."""

    def __init__(self, root: Path, source: str, stamp: Stamp, header: dict,
                 idx_dir: Path | None) -> None:
        super().__init__(root, source, stamp)
        self.idx_dir, self.fingerprint = idx_dir, header.get("fingerprint") or {}
        wanted = "fashion-mnist-idx" if idx_dir else "fashion-mnist-subset"
        if self.fingerprint.get("kind") != wanted:
            raise DataError(f"{root / INVENTORY} was not made from the {wanted} that "
                            f"data.embedded_idx_dir names; {REFETCH}")

    def read(self, rel: str) -> bytes:
        size = self.entry(rel)[0]
        _, arrays = _arrays(self.idx_dir, self.fingerprint)
        split, _, index = rel.split("/")[-1].removesuffix(".png").partition("_")
        images, rows = arrays[split]
        data = encode_gray_png(images[rows[int(index)]])
        if len(data) != size:
            raise DataError(f"{rel}: encoded {len(data)} bytes, the fetch recorded {size} (a "
                            f"different zlib than the fetch's?); {REFETCH}")
        return data
