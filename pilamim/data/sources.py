"""Turn ``DataParams.source`` into a folder of images, one subfolder per class.

Three kinds of source, one result (an image root folder) so ``prepare`` never cares where
images came from:

- ``embedded``: the bundled Fashion-MNIST subset (or, with ``embedded_idx_dir``, the full IDX
  files) written as PNGs into ``<raw_dir>/fashion-mnist`` (``<raw_dir>/fashion-mnist-full``),
  by the functions at the end of this module. The folder is filled in a hidden temp folder and
  renamed into place with a marker file, so a killed run never leaves a half folder that looks
  complete; a second call is a no-op.
- a local folder: validated and mirrored by hard links into ``<raw_dir>/local/<name>``
  (:mod:`pilamim.data.local_source`).
- ``s3://bucket/prefix``: mirrored into ``<raw_dir>/s3/<bucket>/<prefix>`` with boto3
  (:mod:`pilamim.data.s3_source`). Unchanged objects (same ETag and size) are not downloaded
  again.

A source never reaches outside itself, and a mirror never writes or deletes outside its own
folder: names joined under ``raw_dir`` must be plain (:func:`pilamim.data.errors.plain_parts`)
and each mirror checks every write and delete against its resolved folder
(:func:`pilamim.data.errors.check_inside`). What a source holds but its mirror leaves out is
logged as a warning here and kept beside the mirror (:mod:`pilamim.data.fetch_report`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pilamim.config import DataParams
from pilamim.data.embedded import SUBSET_PATH
from pilamim.data.errors import DataError
from pilamim.data.fetch_report import FETCH_REPORT, FetchReport, save_fetch_report
from pilamim.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, load_fashion_mnist
from pilamim.data.local_source import local_mirror_name, materialize_local
from pilamim.data.s3_source import materialize_s3, parse_s3_uri
from pilamim.io import atomic_write_json

log = logging.getLogger(__name__)

EMBEDDED_DIR = "fashion-mnist"
EMBEDDED_FULL_DIR = "fashion-mnist-full"
MARKER = ".pilamim-source.json"
PNG_WRITER_THREADS = 4


def image_root(params: DataParams) -> Path:
    """Where ``materialize`` puts the images of ``params.source``, under ``raw_dir``.

    Every source lands under ``raw_dir`` (a local folder is mirrored there by hard links), so
    the ``fetch`` stage's one DVC output versions exactly the images that were used.
    """
    source = params.source.strip()
    raw_dir = Path(params.raw_dir).expanduser().absolute()
    if source == "embedded":
        return raw_dir / (EMBEDDED_FULL_DIR if params.embedded_idx_dir else EMBEDDED_DIR)
    if source.startswith("s3://"):
        bucket, prefix = parse_s3_uri(source)
        return raw_dir / "s3" / bucket / prefix if prefix else raw_dir / "s3" / bucket
    return raw_dir / "local" / local_mirror_name(source)


def materialize(params: DataParams) -> Path:
    """Fetch ``params.source`` into :func:`image_root` (idempotent); return that folder."""
    source = params.source.strip()
    raw_dir = Path(params.raw_dir).expanduser().absolute()
    if source == "embedded":
        if params.embedded_idx_dir:
            root = _materialize_idx(Path(params.embedded_idx_dir).expanduser(), raw_dir)
        else:
            root = _materialize_subset(SUBSET_PATH, raw_dir)
        check_image_root(root, source)
        return root
    root = image_root(params)  # refuses bad names before anything is written
    if source.startswith("s3://"):
        report = FetchReport(empty_classes=materialize_s3(source, root,
                                                          keep=frozenset({FETCH_REPORT})))
    else:
        folder = Path(source).expanduser().absolute()
        check_image_root(folder, source)
        report = materialize_local(folder, root, source)
    _warn(report, source)
    save_fetch_report(root, report)
    check_image_root(root, source)
    return root


def _warn(report: FetchReport, source: str) -> None:
    for entry in report.skipped:
        log.warning("data.source %s: leaving out %s: %s", source, entry["path"], entry["reason"])
    if report.empty_classes:
        log.warning("data.source %s: class folder(s) without any file: %s", source,
                    ", ".join(report.empty_classes))


def check_image_root(root: Path, source: str | None = None) -> list[str]:
    """Fail with a clear message unless ``root`` is a folder with class subfolders.

    Returns the class folder names (sorted; hidden folders ignored).
    """
    what = f"data.source {source!r}" if source and source != str(root) else "image folder"
    if not root.exists():
        raise DataError(
            f"{what}: {root} does not exist. Set data.source to 'embedded', an image folder "
            "(one subfolder per class) or s3://bucket/prefix."
        )
    if not root.is_dir():
        raise DataError(f"{what}: {root} is not a folder; expected <folder>/<class>/<image>.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"{what}: {root} has no class subfolders; expected <folder>/<class name>/<image files>."
        )
    return classes


# --------------------------------------------------------------------------- embedded


def _materialize_subset(npz_path: Path, raw_dir: Path) -> Path:
    if not npz_path.is_file():
        raise DataError(f"bundled data set {npz_path} is missing; reinstall pilamim")
    fingerprint = {"kind": "fashion-mnist-subset", "sha256": _sha256_file(npz_path)}

    def fill(folder: Path) -> int:
        with np.load(npz_path) as z:
            classes = [str(c) for c in z["classes"]]
            splits = [(s, z[f"{s}_images"], z[f"{s}_labels"], z[f"{s}_index"])
                      for s in ("train", "test")]
        return _write_pngs(folder, classes, splits)

    return _atomic_folder(raw_dir / EMBEDDED_DIR, fingerprint, fill)


def _materialize_idx(idx_dir: Path, raw_dir: Path) -> Path:
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    missing = [n for n in names if not (idx_dir / n).is_file()]
    if missing:
        raise DataError(
            f"data.embedded_idx_dir {idx_dir} lacks {', '.join(missing)}; it must hold the four "
            "Fashion-MNIST gzip IDX files (Debian: apt-get install dataset-fashion-mnist -> "
            "/usr/share/datasets/fashion-mnist), or set it to null for the bundled subset."
        )
    fingerprint = {"kind": "fashion-mnist-idx",
                   "sha256": {n: _sha256_file(idx_dir / n) for n in names}}

    def fill(folder: Path) -> int:
        try:
            data = load_fashion_mnist(idx_dir)
        except ValueError as err:
            raise DataError(f"data.embedded_idx_dir {idx_dir}: {err}") from err
        splits = [(s, images, labels, np.arange(len(labels)))
                  for s, (images, labels) in data.items()]
        return _write_pngs(folder, list(FASHION_MNIST_CLASSES), splits)

    return _atomic_folder(raw_dir / EMBEDDED_FULL_DIR, fingerprint, fill)


def _write_pngs(folder: Path, classes: list[str], splits) -> int:
    """Write ``<folder>/<class>/<split>_<index>.png`` for every image; return the count.

    A few threads overlap PNG encoding and file creation (zlib and file I/O release the GIL).
    """
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
    jobs = [(image, folder / classes[int(label)] / f"{split}_{int(i):05d}.png")
            for split, images, labels, index in splits
            for image, label, i in zip(images, labels, index, strict=True)]

    def write(batch) -> int:
        for image, path in batch:
            path.write_bytes(encode_gray_png(image))
        return len(batch)

    batches = [jobs[i:i + 250] for i in range(0, len(jobs), 250)]
    with (ThreadPoolExecutor(max_workers=PNG_WRITER_THREADS) as pool,
          tqdm(total=len(jobs), desc=f"writing {folder.name[:40]}", unit="img",
               disable=None) as bar):
        for written in pool.map(write, batches):
            bar.update(written)
    return len(jobs)


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


def _atomic_folder(target: Path, fingerprint: dict, fill: Callable[[Path], int]) -> Path:
    """Create ``target`` by ``fill(temp)`` + rename, unless it already holds ``fingerprint``.

    The marker file (fingerprint + image count) is written last inside the temp folder, so a
    folder with a matching marker is always complete.
    """
    if _marker_matches(target, fingerprint):
        log.info("%s is up to date", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the data folder should be readable
        count = fill(tmp)
        atomic_write_json(tmp / MARKER, {**fingerprint, "count": count})
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            os.replace(target, old / "old")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _marker_matches(target: Path, fingerprint: dict) -> bool:
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if {k: v for k, v in marker.items() if k != "count"} != fingerprint:
        return False
    # Cheap guard against files deleted by hand after the folder was made.
    found = sum(len(os.listdir(d)) for d in target.iterdir() if d.is_dir())
    return found == marker.get("count")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
