"""Stage ``prepare``: image folder -> validated, split, hashed manifest + data set statistics.

Everything here is deterministic: files are visited in sorted order, each class is shuffled by
its own generator seeded with ``(seed, class index)``, and floats are rounded before they are
written, so the same inputs give byte-identical ``manifest.csv`` and ``dataset.json``. The
digest (sha256 of the manifest bytes) is therefore a stable data version that every model can
be traced back to.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pilamim.config import DataParams
from pilamim.data.errors import DataError
from pilamim.data.prepared import (
    DATASET_FILE,
    FORMAT_VERSION,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    PreparedDataset,
    load_prepared,
)
from pilamim.data.sources import check_image_root, image_root, materialize
from pilamim.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F"})
STAT_DECIMALS = 6
MAX_BAD_LISTED = 20


@dataclass(frozen=True)
class _Checked:
    """One usable image: where it is, its hash, and pixel sums for mean/std."""

    rel: str
    sha256: str
    gray: bool
    pixels: int
    sums: tuple[float, float, float]  # per RGB channel, values in [0, 1]
    squares: tuple[float, float, float]


def prepare(params: DataParams, fetch: bool = True) -> PreparedDataset:
    """Validate and split the source's images, write manifest + dataset.json.

    Every non-hidden file below a class folder is a candidate; files PIL cannot fully decode
    are listed in ``skipped`` (or fail the run with ``bad_images: fail``). With ``fetch`` the
    source is materialised first; the ``prepare`` stage passes False and reads what the
    ``fetch`` stage left under ``raw_dir`` (DVC versions that separately).
    """
    root = materialize(params) if fetch else image_root(params)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist: run `pilamim fetch` first")
    classes = check_image_root(root, params.source)
    out_dir = Path(params.out_dir).expanduser().absolute()

    kept: dict[str, list[_Checked]] = {}
    skipped: list[dict[str, str]] = []
    files = {name: _list_files(root, name) for name in classes}
    cap = params.max_images_per_class
    total = sum(min(len(v), cap) if cap else len(v) for v in files.values())
    with tqdm(total=total, desc="validating images", unit="img", disable=None) as bar:
        for class_index, name in enumerate(classes):
            candidates = files[name]
            rng = np.random.default_rng([params.seed, class_index])
            order = [candidates[i] for i in rng.permutation(len(candidates))]
            good: list[_Checked] = []
            for rel in order:
                if cap and len(good) >= cap:
                    break
                checked = _check_image(root, rel, skipped)
                if checked is not None:
                    good.append(checked)
                bar.update()
            kept[name] = good

    skipped.sort(key=lambda s: s["path"])
    if skipped and params.bad_images == "fail":
        listed = "\n".join(f"  {s['path']}: {s['reason']}" for s in skipped[:MAX_BAD_LISTED])
        more = f"\n  ... and {len(skipped) - MAX_BAD_LISTED} more" if (
            len(skipped) > MAX_BAD_LISTED) else ""
        raise DataError(
            f"{len(skipped)} unreadable image(s) under {root} (data.bad_images: fail):\n"
            f"{listed}{more}\nRemove or fix them, or set data.bad_images: skip."
        )
    for entry in skipped:
        log.warning("skipping %s: %s", entry["path"], entry["reason"])

    empty = [name for name in classes if not kept[name]]
    classes = [name for name in classes if kept[name]]
    if not classes:
        raise DataError(f"no usable images under {root} ({len(skipped)} unreadable); "
                        "expected <folder>/<class name>/<image files> that PIL can decode")
    if empty:
        log.warning("classes without usable images are left out: %s", ", ".join(empty))

    rows: list[tuple[str, str, str, str]] = []
    train: list[_Checked] = []
    counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    for name in classes:
        n_test, n_val = split_sizes(len(kept[name]), params.test_fraction, params.val_fraction)
        for position, item in enumerate(kept[name]):
            split = "test" if position < n_test else "val" if position < n_test + n_val else "train"
            rows.append((item.rel, name, split, item.sha256))
            counts[split][name] = counts[split].get(name, 0) + 1
            if split == "train":
                train.append(item)
    rows.sort()

    channels = 1 if all(item.gray for items in kept.values() for item in items) else 3
    mean, std = _mean_std(sorted(train, key=lambda c: c.rel), channels)
    manifest = _manifest_text(rows)
    digest = hashlib.sha256(manifest.encode()).hexdigest()
    info = {
        "format_version": FORMAT_VERSION,
        "source": params.source,
        "root": _portable_root(root, out_dir),
        "classes": classes,
        "channels": channels,
        "mean": mean,
        "std": std,
        "counts": {s: {name: counts[s].get(name, 0) for name in classes} for s in SPLITS},
        "num_images": {**{s: sum(counts[s].values()) for s in SPLITS}, "total": len(rows)},
        "skipped": skipped,
        "empty_classes": empty,
        "split": {"seed": params.seed, "val_fraction": params.val_fraction,
                  "test_fraction": params.test_fraction,
                  "max_images_per_class": params.max_images_per_class},
        "digest": digest,
    }
    # dataset.json last: it names the manifest's digest, so it marks a complete output.
    atomic_write_text(out_dir / MANIFEST_FILE, manifest)
    atomic_write_json(out_dir / DATASET_FILE, info)
    log.info("prepared %d images in %d classes (%d skipped) -> %s, digest %s", len(rows),
             len(classes), len(skipped), out_dir, digest[:12])
    return load_prepared(out_dir)


def split_sizes(n: int, test_fraction: float, val_fraction: float) -> tuple[int, int]:
    """How many of a class's ``n`` images go to test and val (the rest is train).

    Rounded half up; a non-zero fraction gets at least one image once the class is big enough
    to keep one for training, and training always keeps at least one image.
    """
    def share(fraction: float, minimum_n: int) -> int:
        k = math.floor(n * fraction + 0.5)
        return max(k, 1) if fraction > 0 and n >= minimum_n else k

    n_test = share(test_fraction, 2)
    n_val = share(val_fraction, 3)
    while n_test + n_val >= n and n_test + n_val > 0:
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_test, n_val


def describe(prepared: PreparedDataset) -> str:
    """A few lines for humans: size, classes, split counts, channels, digest."""
    lines = [f"{len(prepared.records)} images, {prepared.num_classes} classes, "
             f"{prepared.channels} channel(s), digest {prepared.digest[:12]}",
             f"root: {prepared.root}"]
    for split in SPLITS:
        lines.append(f"{split:>5}: {len(prepared.split(split))}")
    lines.append("classes: " + ", ".join(prepared.classes))
    if prepared.skipped:
        lines.append(f"skipped {len(prepared.skipped)} unreadable file(s)")
    return "\n".join(lines)


def _list_files(root: Path, class_name: str) -> list[str]:
    """Every non-hidden file below a class folder, as sorted root-relative POSIX paths.

    Plain strings, not ``Path`` objects: listing a million-image folder stays fast.
    """
    found = []
    top = os.path.join(root, class_name)
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        found.extend(f"{rel_dir}/{f}" for f in filenames if not f.startswith("."))
    return sorted(found)


def _check_image(root: Path, rel: str, skipped: list[dict[str, str]]) -> _Checked | None:
    """Decode the whole file; return its hash and pixel sums, or record why it is unusable."""
    from PIL import Image

    try:
        data = (root / rel).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            gray = img.mode in GRAY_MODES
            array = np.asarray(img.convert("L" if gray else "RGB"), dtype=np.float64) / 255.0
    except Exception as err:  # PIL raises many exception types for bad files
        skipped.append({"path": rel, "reason": f"{type(err).__name__}: {err}"})
        return None
    if gray:
        s, q = float(array.sum()), float(np.square(array).sum())
        sums, squares = (s, s, s), (q, q, q)
    else:
        flat = array.reshape(-1, 3)
        sums = tuple(float(v) for v in flat.sum(axis=0))
        squares = tuple(float(v) for v in np.square(flat).sum(axis=0))
    pixels = array.shape[0] * array.shape[1]
    return _Checked(rel, hashlib.sha256(data).hexdigest(), gray, pixels, sums, squares)


def _mean_std(train: list[_Checked], channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of the training pixels, in [0, 1] units."""
    pixels = sum(c.pixels for c in train)
    if pixels == 0:
        return [0.5] * channels, [0.5] * channels
    sums = np.array([c.sums for c in train], dtype=np.float64).sum(axis=0)
    squares = np.array([c.squares for c in train], dtype=np.float64).sum(axis=0)
    mean = sums / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean**2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)  # a constant channel must not divide by zero
    return ([round(float(m), STAT_DECIMALS) for m in mean[:channels]],
            [round(float(s), STAT_DECIMALS) for s in std[:channels]])


def _manifest_text(rows: list[tuple[str, str, str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    writer.writerows(rows)
    return buffer.getvalue()


def _portable_root(root: Path, out_dir: Path) -> str:
    """The image root relative to ``out_dir`` when possible, so the pair can move together."""
    try:
        return Path(os.path.relpath(root, out_dir)).as_posix()
    except ValueError:  # different drives on Windows
        return root.as_posix()
