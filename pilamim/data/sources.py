"""Turn ``DataParams.source`` into a folder of images, one subfolder per class.

Three kinds of source, one result (an image root folder) so ``prepare`` never cares where
images came from:

- ``embedded``: the bundled Fashion-MNIST subset (or, with ``embedded_idx_dir``, the full IDX
  files) written as PNGs into ``<raw_dir>/fashion-mnist`` (``<raw_dir>/fashion-mnist-full``).
  The folder is filled in a hidden temp folder and renamed into place with a marker file, so a
  killed run never leaves a half folder that looks complete; a second call is a no-op.
- a local folder: validated and mirrored by hard links into ``<raw_dir>/local/<name>``.
- ``s3://bucket/prefix``: mirrored into ``<raw_dir>/s3/<bucket>/<prefix>`` with boto3, which
  takes endpoint and credentials from the usual AWS settings (``AWS_ENDPOINT_URL``,
  ``AWS_ACCESS_KEY_ID`` ...). Unchanged objects (same ETag and size) are not downloaded again.

A source never reaches outside itself, and a mirror never writes or deletes outside its own
folder: names joined under ``raw_dir`` must be plain (see :func:`plain_parts`), every write and
delete is checked against the resolved mirror folder (:func:`check_inside`), and in a local
folder a symbolic link is followed only when it is a file link whose target stays inside the
folder (then the target's bytes are mirrored). Links pointing outside, broken links and links to
folders (never followed: loops, double counting) are skipped. What a source holds but its mirror
leaves out (those links, and class folders without any file, which an image folder cannot
carry through DVC) is logged as a warning and written to ``<mirror>/.pilamim-fetch.json``;
``prepare`` lists it in ``dataset.json`` and, with ``bad_images: fail``, refuses it. The fetch
itself never looks at ``bad_images``: the ``fetch`` stage does not depend on that setting, so its
output must not either.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pilamim.config import DataParams
from pilamim.data.embedded import SUBSET_PATH
from pilamim.data.errors import DataError, check_inside, plain_parts
from pilamim.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, load_fashion_mnist
from pilamim.data.s3_source import materialize_s3, parse_s3_uri
from pilamim.io import atomic_write_json

log = logging.getLogger(__name__)

EMBEDDED_DIR = "fashion-mnist"
EMBEDDED_FULL_DIR = "fashion-mnist-full"
MARKER = ".pilamim-source.json"
FETCH_REPORT = ".pilamim-fetch.json"
PNG_WRITER_THREADS = 4
LINK_OUTSIDE = "symbolic link pointing outside the source folder"
LINK_BROKEN = "symbolic link to nothing (broken) or to something that is not a file"
LINK_FOLDER = "symbolic link to a folder (folder links are never followed)"


@dataclass
class FetchReport:
    """What a source holds that its mirror leaves out; ``prepare`` reports (or refuses) it.

    ``skipped`` entries look like ``prepare``'s own (``{"path", "reason"}``, paths relative to
    the source) so ``dataset.json`` lists both kinds in one place.
    """

    skipped: list[dict[str, str]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)


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
    return raw_dir / "local" / _local_name(source)


def _local_name(source: str) -> str:
    """The mirror folder name of a local source: its last path part, which must be a name.

    ``/data/imgs/..`` or ``/`` would otherwise make the mirror folder ``raw_dir`` itself (or its
    parent), and mirroring deletes whatever there is not in the source.
    """
    name = Path(source).expanduser().absolute().name
    plain_parts(name, f"data.source {source!r}: its last part",
                "name the image folder itself, without a trailing '..' (e.g. /data/images)")
    return name


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
        _refuse_overlap(folder, root, source)
        files, report = scan_local(folder)
        _mirror_local(files, root)
    _warn(report, source)
    _save_fetch_report(root, report)
    check_image_root(root, source)
    return root


def _save_fetch_report(root: Path, report: FetchReport) -> None:
    """Write ``report`` into the mirror, only when it changed (a rerun leaves data/raw alone)."""
    path = check_inside(root / FETCH_REPORT, root, "write")
    if not path.is_file() or read_fetch_report(root) != report:
        atomic_write_json(path, {"skipped": report.skipped,
                                 "empty_classes": report.empty_classes})


def read_fetch_report(root: Path) -> FetchReport:
    """The :class:`FetchReport` a local or S3 mirror left in ``root`` (empty if none)."""
    try:
        saved = json.loads((root / FETCH_REPORT).read_text())
    except (OSError, ValueError):
        return FetchReport()
    return FetchReport(list(saved.get("skipped", [])), list(saved.get("empty_classes", [])))


def _warn(report: FetchReport, source: str) -> None:
    for entry in report.skipped:
        log.warning("data.source %s: leaving out %s: %s", source, entry["path"], entry["reason"])
    if report.empty_classes:
        log.warning("data.source %s: class folder(s) without any file: %s", source,
                    ", ".join(report.empty_classes))


def _refuse_overlap(folder: Path, dest: Path, source: str) -> None:
    """Refuse a source folder that holds its own mirror (or lies inside it).

    The mirror would copy itself on every fetch, or delete the source's files as stale.
    """
    a, b = folder.resolve(), dest.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise DataError(f"data.source {source!r} ({a}) overlaps its mirror folder {b} under "
                        "raw_dir; keep the images in a folder of their own outside raw_dir")


def scan_local(source: Path) -> tuple[dict[str, Path], FetchReport]:
    """Every file of ``source`` to mirror (root-relative POSIX path -> path), and what is left out.

    Folder links are listed, never entered; a file link is kept only when its target is a file
    inside ``source`` (so a source never reaches outside itself). Class folders (non-hidden
    top-level folders) left without any file are reported: the mirror cannot keep them.
    """
    real_root = source.resolve()
    files: dict[str, Path] = {}
    report = FetchReport()
    for dirpath, dirnames, filenames in os.walk(source):  # does not enter linked folders
        here = Path(dirpath)
        dirnames.sort()
        for name in dirnames:
            if (here / name).is_symlink():
                report.skipped.append({"path": _rel(here / name, source), "reason": LINK_FOLDER})
        for name in sorted(filenames):
            path = here / name
            if not path.is_symlink():
                if path.is_file():
                    files[_rel(path, source)] = path
                continue
            target = Path(os.path.realpath(path))  # never raises, even on loops
            reason = _link_problem(target, real_root)
            if reason:
                report.skipped.append({"path": _rel(path, source), "reason": reason})
            else:  # os.link would link the link itself, which DVC would follow later
                files[_rel(path, source)] = target
    filled = {rel.split("/", 1)[0] for rel in files if "/" in rel}
    report.empty_classes = [p.name for p in sorted(source.iterdir())
                            if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
                            and p.name not in filled]
    report.skipped.sort(key=lambda s: s["path"])
    return files, report


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _link_problem(target: Path, real_root: Path) -> str | None:
    """Why a file link resolving to ``target`` may not be mirrored, or None when it may."""
    if target != real_root and real_root not in target.parents:
        return LINK_OUTSIDE
    return None if target.is_file() else LINK_BROKEN


def _mirror_local(files: dict[str, Path], dest: Path) -> Path:
    """Make ``dest`` hold exactly ``files`` (plus our report), by hard links (a copy across file
    systems); files unchanged since the last mirror (same size and mtime) are left alone, stale
    ones removed. Every write and delete is checked to stay inside ``dest``."""
    inside: set[Path] = set()
    for rel in sorted(files):
        src, dst = files[rel], check_inside(dest / rel, dest, "write", inside)
        st = src.stat()
        if dst.exists():
            dt = dst.stat()
            if (dt.st_size, dt.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
                continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    if dest.exists():
        for path in sorted(dest.rglob("*"), reverse=True):
            rel = path.relative_to(dest).as_posix()
            if (path.is_file() or path.is_symlink()) and rel not in files and rel != FETCH_REPORT:
                check_inside(path, dest, "delete", inside).unlink()
            elif path.is_dir() and not any(path.iterdir()):
                check_inside(path, dest, "delete", inside).rmdir()
    return dest


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
