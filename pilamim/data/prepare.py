"""Stage ``prepare``: image folder -> validated, split, hashed manifest + data set statistics.

Everything here is deterministic: files are visited in sorted order, each class is shuffled by
its own generator seeded with ``(seed, class index)``, and floats are rounded before they are
written, so the same inputs give byte-identical ``manifest.csv`` and ``dataset.json``. The
digest (sha256 of the manifest bytes) is therefore a stable data version that every model can
be traced back to. How each image is decoded, checked and measured for mean/std (as the model
sees it, with bounded memory): :mod:`pilamim.data.image_check`.
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
from typing import Any

import numpy as np
from tqdm import tqdm

from pilamim.config import DataParams, ModelParams
from pilamim.data.errors import DataError
from pilamim.data.fetch_report import read_fetch_report
from pilamim.data.image_check import CheckedImage, check_image, mean_std
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
MAX_BAD_LISTED = 20
# The model's default input size; the size mean/std are measured at unless told otherwise.
DEFAULT_IMG_SIZE: int = ModelParams.model_fields["img_size"].default


@dataclass(frozen=True)
class _Inventory:
    """What validation found: the classes that keep images (folder order), each class's usable
    images (in its shuffled order, which the split follows), and what was left out."""

    classes: list[str]
    kept: dict[str, list[CheckedImage]]
    skipped: list[dict[str, str]]  # sorted by path
    empty: list[str]  # class folders without usable images


@dataclass(frozen=True)
class _Splits:
    """The manifest rows (sorted), the training images (for mean/std) and per-split counts."""

    rows: list[tuple[str, str, str, str]]
    train: list[CheckedImage]
    counts: dict[str, dict[str, int]]


def prepare(params: DataParams, fetch: bool = True,
            img_size: int = DEFAULT_IMG_SIZE) -> PreparedDataset:
    """Validate and split the source's images, write manifest + dataset.json.

    Every non-hidden file below a class folder is a candidate; files PIL cannot fully decode
    are listed in ``skipped``, together with what the fetch left out (links leading outside
    the source), and class folders without usable images in ``empty_classes``. With
    ``bad_images: fail`` any of these fails the run instead: a strict run must not quietly lose
    a file or a whole class (which changes the number of classes a model is trained for).
    With ``fetch`` the source is materialised first; the ``prepare`` stage passes False and
    reads what the ``fetch`` stage left under ``raw_dir`` (DVC versions that separately).
    ``img_size`` is the model's input size, the size mean/std are measured at.
    """
    root = materialize(params) if fetch else image_root(params)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist: run `pilamim fetch` first")
    classes = check_image_root(root, params.source)
    out_dir = Path(params.out_dir).expanduser().absolute()
    kept, skipped = _validate_images(root, classes, params, img_size)
    inventory = _take_stock(root, classes, kept, skipped, params.bad_images)
    splits = _assign_splits(inventory, params)
    manifest = _manifest_text(splits.rows)
    digest = hashlib.sha256(manifest.encode()).hexdigest()
    info = _dataset_info(params, root, out_dir, inventory, splits, img_size, digest)
    # dataset.json last: it names the manifest's digest, so it marks a complete output.
    atomic_write_text(out_dir / MANIFEST_FILE, manifest)
    atomic_write_json(out_dir / DATASET_FILE, info)
    log.info("prepared %d images in %d classes (%d skipped) -> %s, digest %s", len(splits.rows),
             len(inventory.classes), len(inventory.skipped), out_dir, digest[:12])
    return load_prepared(out_dir)


def _validate_images(root: Path, classes: list[str], params: DataParams,
                     img_size: int) -> tuple[dict[str, list[CheckedImage]], list[dict[str, str]]]:
    """Each class's usable images in a seeded shuffled order, decoding only until the cap is
    reached (a capped run never decodes the whole folder); plus every unusable file seen."""
    kept: dict[str, list[CheckedImage]] = {}
    skipped: list[dict[str, str]] = []
    files = {name: _list_files(root, name) for name in classes}
    cap = params.max_images_per_class
    total = sum(min(len(v), cap) if cap else len(v) for v in files.values())
    with tqdm(total=total, desc="validating images", unit="img", disable=None) as bar:
        for class_index, name in enumerate(classes):
            candidates = files[name]
            rng = np.random.default_rng([params.seed, class_index])
            order = [candidates[i] for i in rng.permutation(len(candidates))]
            good: list[CheckedImage] = []
            for rel in order:
                if cap and len(good) >= cap:
                    break
                checked = check_image(root, rel, skipped, img_size)
                if checked is not None:
                    good.append(checked)
                bar.update()
            kept[name] = good
    return kept, skipped


def _take_stock(root: Path, classes: list[str], kept: dict[str, list[CheckedImage]],
                skipped: list[dict[str, str]], bad_images: str) -> _Inventory:
    """Add what the fetch left out, then refuse (``bad_images: fail``) or warn about every
    unusable file and empty class, and keep only the classes that have images."""
    fetched = read_fetch_report(root)
    skipped = sorted(skipped + fetched.skipped, key=lambda s: s["path"])
    empty = sorted({name for name in classes if not kept[name]} | set(fetched.empty_classes))
    if (skipped or empty) and bad_images == "fail":
        raise DataError(_refusal(root, skipped, empty))
    for entry in skipped:
        log.warning("skipping %s: %s", entry["path"], entry["reason"])

    classes = [name for name in classes if kept[name]]
    if not classes:
        raise DataError(f"no usable images under {root} ({len(skipped)} unusable); "
                        "expected <folder>/<class name>/<image files> that PIL can decode")
    if empty:
        log.warning("class folders without usable images are left out: %s", ", ".join(empty))
    return _Inventory(classes, kept, skipped, empty)


def _assign_splits(inventory: _Inventory, params: DataParams) -> _Splits:
    """Per class, the first images of its shuffled order go to test, the next to val, the rest
    to train (:func:`split_sizes`); rows are sorted so the manifest does not depend on order."""
    rows: list[tuple[str, str, str, str]] = []
    train: list[CheckedImage] = []
    counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    for name in inventory.classes:
        items = inventory.kept[name]
        n_test, n_val = split_sizes(len(items), params.test_fraction, params.val_fraction)
        for position, item in enumerate(items):
            split = "test" if position < n_test else "val" if position < n_test + n_val else "train"
            rows.append((item.rel, name, split, item.sha256))
            counts[split][name] = counts[split].get(name, 0) + 1
            if split == "train":
                train.append(item)
    rows.sort()
    return _Splits(rows, train, counts)


def _dataset_info(params: DataParams, root: Path, out_dir: Path, inventory: _Inventory,
                  splits: _Splits, img_size: int, digest: str) -> dict[str, Any]:
    """``dataset.json``: classes, channels, train mean/std, counts, what was left out, the
    split settings and the manifest's digest. Gray only if every kept image is gray."""
    classes, counts = inventory.classes, splits.counts
    channels = 1 if all(item.gray for items in inventory.kept.values() for item in items) else 3
    mean, std = mean_std(sorted(splits.train, key=lambda c: c.rel), channels)
    return {
        "format_version": FORMAT_VERSION,
        "source": params.source,
        "root": _portable_root(root, out_dir),
        "classes": classes,
        "channels": channels,
        "mean": mean,
        "std": std,
        "counts": {s: {name: counts[s].get(name, 0) for name in classes} for s in SPLITS},
        "num_images": {**{s: sum(counts[s].values()) for s in SPLITS},
                       "total": len(splits.rows)},
        "stats_img_size": img_size,
        "skipped": inventory.skipped,
        "empty_classes": inventory.empty,
        "split": {"seed": params.seed, "val_fraction": params.val_fraction,
                  "test_fraction": params.test_fraction,
                  "max_images_per_class": params.max_images_per_class},
        "digest": digest,
    }


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
        lines.append(f"skipped {len(prepared.skipped)} unusable file(s)")
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


def _refusal(root: Path, skipped: list[dict[str, str]], empty: list[str]) -> str:
    """The ``bad_images: fail`` message: every problem, listed (the first few), and the fix."""
    lines = []
    if skipped:
        lines.append(f"{len(skipped)} unusable file(s) under {root} (data.bad_images: fail):")
        lines += [f"  {s['path']}: {s['reason']}" for s in skipped[:MAX_BAD_LISTED]]
        if len(skipped) > MAX_BAD_LISTED:
            lines.append(f"  ... and {len(skipped) - MAX_BAD_LISTED} more")
    if empty:
        lines.append(f"{len(empty)} class folder(s) without usable images under {root} "
                     f"(data.bad_images: fail): {', '.join(empty)}")
    lines.append("Remove or fix them (add images to an empty class folder or remove it), "
                 "or set data.bad_images: skip.")
    return "\n".join(lines)


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
