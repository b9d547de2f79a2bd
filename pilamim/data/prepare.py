"""Stage ``prepare``: a fetched source -> validated, split, hashed shards + manifest + statistics.

Every image is read once: the split is decided from the listing (each class shuffled by its own
generator seeded with ``(seed, class index)``; its first images go to test, the next to val, the
rest to train), the images of each split are cut into shard ranges by listed size, and one task
per range reads, decodes, checks, hashes and writes its chunk (:mod:`pilamim.data.shards`) on
every core or on a Dask cluster (:mod:`pilamim.data.task_runner`). A file that turns out
unusable leaves a hole in its split (listed in ``skipped``) rather than moving the other
images, so no image's split depends on another image's bytes.

Everything is deterministic: same inputs, byte-identical chunks, ``manifest.csv`` and
``dataset.json``, whatever the core count. The digest covers the manifest (every image's path,
class, split and sha256) and every chunk's sha256, so it is the identity of the shard set that
every model is traced back to. How each image is checked and measured for mean/std:
:mod:`pilamim.data.image_check`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pilamim.config import DataParams, ModelParams
from pilamim.data.errors import DataError
from pilamim.data.image_check import CheckedImage, mean_std
from pilamim.data.inventory import INVENTORY
from pilamim.data.prepared import (
    DATASET_FILE,
    FORMAT_VERSION,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    SHARDS_DIR,
    PreparedDataset,
    data_digest,
    load_prepared,
)
from pilamim.data.progress import Progress
from pilamim.data.remote_shards import upload
from pilamim.data.shards import (
    ShardOptions,
    ShardTask,
    checked_images,
    finish_split,
    plan_tasks,
    publish,
    read_result,
    write_shard,
)
from pilamim.data.source_files import SourceFiles, open_files
from pilamim.data.sources import image_root, materialize
from pilamim.data.task_runner import run_each, task_executor
from pilamim.io import atomic_write_json, atomic_write_text, file_sha256

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MAX_BAD_LISTED = 20
# The model's default input size; the size mean/std are measured at unless told otherwise.
DEFAULT_IMG_SIZE: int = ModelParams.model_fields["img_size"].default
WORK_DIR = ".prepare-work"  # beside out_dir: unfinished shard ranges, resumed by a rerun
# Less work than this runs in this process: a spawned worker first spends ~2 CPU seconds
# importing torch (litdata imports it), more than a few MB of images take to check.
POOL_MIN_BYTES = 32 * 2**20


@dataclass(frozen=True)
class _Plan:
    """The listing's decisions: classes, each image's split, the shard ranges."""

    classes: list[str]
    tasks: list[ShardTask]
    images: int


def prepare(params: DataParams, fetch: bool = True,
            img_size: int = DEFAULT_IMG_SIZE) -> PreparedDataset:
    """Split the source's images and write them as shards, with manifest and dataset.json.

    Every non-hidden file below a class folder is a candidate; files PIL cannot fully decode
    are listed in ``skipped``, together with what the fetch left out (links leading outside
    the source), and class folders without usable images in ``empty_classes``. With
    ``bad_images: fail`` any of these fails the run instead: a strict run must not quietly lose
    a file or a whole class (which changes the number of classes a model is trained for).
    With ``fetch`` the source is fetched first; the ``prepare`` stage passes False and reads
    what the ``fetch`` stage recorded under ``raw_dir`` (DVC versions that separately).
    ``img_size`` is the model's input size, the size mean/std are measured at.

    With ``dask_scheduler`` the shard tasks run on that cluster's workers, which read the
    source and the fetch's inventory themselves and write into ``.prepare-work/`` beside
    ``out_dir``: they must reach the source (the same path, or S3) and ``raw_dir``, and share
    ``out_dir``'s parent folder with this machine.
    """
    if fetch:
        materialize(params)
    files = open_files(params)
    plan = _plan(files, params)
    out_dir = Path(params.out_dir).expanduser().absolute()
    work = _work_dir(out_dir, plan, params, img_size)
    options = ShardOptions(img_size, params.max_side, params.jpeg_quality)
    results = _run_tasks(files, plan, work, options, params)
    kept = {s: [c for r in results[s] for c in checked_images(r)] for s in SPLITS}
    skipped = sorted((e for s in SPLITS for r in results[s] for e in r["skipped"]),
                     key=lambda e: e["path"])
    classes, empty, skipped = _take_stock(files, plan.classes, kept, skipped, params.bad_images)
    # Within a split the manifest lists the images in shard order: a loader's index i is the
    # manifest's i-th image of the split and the i-th item of its shards.
    rows = [(c.rel, _class_of(c.rel), s, c.sha256) for s in SPLITS for c in kept[s]]
    if params.shard_order == "path":
        rows.sort()
    manifest = _manifest_text(rows)
    shards = {s: {"dir": f"{SHARDS_DIR}/{s}", "items": len(kept[s]),
                  "chunks": [r["chunk"] for r in results[s] if r["chunk"]]} for s in SPLITS}
    digest = data_digest(manifest, shards)
    for split in SPLITS:
        if shards[split]["chunks"]:
            finish_split(work / SHARDS_DIR / split, len(shards[split]["chunks"]), digest)
    gray = all(c.gray for s in SPLITS for c in kept[s])
    info = _dataset_info(params, classes, empty, skipped, rows, kept["train"], gray, img_size,
                         shards, hashlib.sha256(manifest.encode()).hexdigest(), digest)
    if params.shards_uri:
        location = f"{params.shards_uri}/{digest}"
        info["shards"].update(location=location, etags=upload(work / SHARDS_DIR, location))
        shutil.rmtree(out_dir / SHARDS_DIR, ignore_errors=True)  # an older local set
    else:
        publish(work / SHARDS_DIR, out_dir / SHARDS_DIR)
    # dataset.json last: it names the manifest's and the shards' digest, so it marks a
    # complete output.
    atomic_write_text(out_dir / MANIFEST_FILE, manifest)
    atomic_write_json(out_dir / DATASET_FILE, info)
    shutil.rmtree(work, ignore_errors=True)
    log.info("prepared %d images in %d classes (%d skipped) -> %s, digest %s", len(rows),
             len(classes), len(skipped), out_dir, digest[:12])
    return load_prepared(out_dir)


def _plan(files: SourceFiles, params: DataParams) -> _Plan:
    """Per class, the candidates in a seeded shuffled order (at most ``max_images_per_class``);
    the first go to test, the next to val, the rest to train; then per split, in path order,
    shard ranges of about ``shard_mb``."""
    classes = files.classes()
    cap = params.max_images_per_class
    by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for class_index, name in enumerate(classes):
        candidates = files.files(name)
        rng = np.random.default_rng([params.seed, class_index])
        order = [candidates[i] for i in rng.permutation(len(candidates))][:cap]
        n_test, n_val = split_sizes(len(order), params.test_fraction, params.val_fraction)
        for position, rel in enumerate(order):
            split = "test" if position < n_test else "val" if position < n_test + n_val else "train"
            by_split[split].append((rel, name))
    shard_bytes = int(params.shard_mb * 2**20)
    tasks = []
    for split_index, split in enumerate(SPLITS):
        items = sorted(by_split[split])
        if params.shard_order == "shuffled":  # its own stream: the split itself stays the same
            rng = np.random.default_rng([params.seed, len(classes) + split_index])
            items = [items[i] for i in rng.permutation(len(items))]
        tasks += plan_tasks(split, items, [files.size(rel) for rel, _ in items], shard_bytes)
    return _Plan(classes, tasks, sum(len(v) for v in by_split.values()))


def _work_dir(out_dir: Path, plan: _Plan, params: DataParams, img_size: int) -> Path:
    """Where this plan's tasks write, beside ``out_dir`` (DVC empties an output before running
    its stage, so unfinished work kept inside it could not be resumed). Named by the plan, so
    a rerun of the same plan resumes and a changed plan starts clean."""
    # The inventory's bytes too: a source changed (and fetched again) between a killed run and
    # its rerun must not mix shards of both versions.
    inventory = file_sha256(image_root(params) / INVENTORY)
    key = json.dumps({"source": params.source, "img_size": img_size, "inventory": inventory,
                      "max_side": params.max_side, "jpeg_quality": params.jpeg_quality,
                      "tasks": [[t.split, t.index, t.items] for t in plan.tasks]})
    parent = out_dir.parent / WORK_DIR
    name = f"{out_dir.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if parent.is_dir():
        for stale in parent.glob(f"{out_dir.name}-*"):
            if stale.name != name:
                shutil.rmtree(stale, ignore_errors=True)
    return parent / name


def _run_tasks(files: SourceFiles, plan: _Plan, work: Path, options: ShardOptions,
               params: DataParams) -> dict[str, list[dict[str, Any]]]:
    """Run every shard task not finished by an earlier (killed) run; results in shard order.

    Small work runs in this process unless a Dask cluster is named (it is then used anyway).
    """
    results: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in SPLITS}
    pending = []
    for task in plan.tasks:
        found = read_result(work / "tasks" / f"{task.name}.json", work / SHARDS_DIR / task.split)
        if found is None:
            pending.append(task)
        else:
            results[task.split][task.index] = found
    done_images = plan.images - sum(len(t.items) for t in pending)
    processes = min(params.workers or _cores(), max(len(pending), 1))
    if sum(t.size for t in pending) < POOL_MIN_BYTES:
        processes = 1
    run = partial(_task, files, work=work, options=options)
    with (task_executor(params.dask_scheduler, processes) as executor,
          closing(run_each(run, pending, executor)) as finished,  # closed: the rest cancelled
          Progress(plan.images, done_images, "preparing images") as progress):
        for task, result in finished:
            _check_visible(task, work)
            results[task.split][task.index] = result
            progress.update(len(task.items))
    return {s: [results[s][i] for i in sorted(results[s])] for s in SPLITS}


def _task(files: SourceFiles, task: ShardTask, work: Path,
          options: ShardOptions) -> dict[str, Any]:
    return write_shard(files, task, work / SHARDS_DIR / task.split,
                       work / "tasks" / f"{task.name}.json", options)


def _check_visible(task: ShardTask, work: Path) -> None:
    """Refuse a task whose result and chunk this process cannot see: Dask workers on other
    machines that wrote to their own disks, so the shards could never be merged here."""
    result = work / "tasks" / f"{task.name}.json"
    if read_result(result, work / SHARDS_DIR / task.split) is None:
        raise DataError(f"shard task {task.name} finished, but its result {result} (or its "
                        "chunk) is not visible here: out_dir must be on a filesystem that every "
                        "Dask worker shares with this machine (data.dask_scheduler)")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _class_of(rel: str) -> str:
    return rel.split("/", 1)[0]


def _take_stock(files: SourceFiles, classes: list[str], kept: dict[str, list[CheckedImage]],
                skipped: list[dict[str, str]],
                bad_images: str) -> tuple[list[str], list[str], list[dict[str, str]]]:
    """Add what the fetch left out, then refuse (``bad_images: fail``) or warn about every
    unusable file and empty class; return the classes that keep images, the empty ones and
    every skipped file."""
    fetched = files.report()
    skipped = sorted(skipped + fetched.skipped, key=lambda s: s["path"])
    filled = {_class_of(c.rel) for split in kept.values() for c in split}
    empty = sorted({name for name in classes if name not in filled} | set(fetched.empty_classes))
    what = f"data.source {files.source!r}"
    if (skipped or empty) and bad_images == "fail":
        raise DataError(_refusal(what, skipped, empty))
    for entry in skipped:
        log.warning("skipping %s: %s", entry["path"], entry["reason"])
    kept_classes = [name for name in classes if name in filled]
    if not kept_classes:
        raise DataError(f"no usable images in {what} ({len(skipped)} unusable); "
                        "expected <folder>/<class name>/<image files> that PIL can decode")
    if empty:
        log.warning("class folders without usable images are left out: %s", ", ".join(empty))
    return kept_classes, empty, skipped


def _dataset_info(params: DataParams, classes: list[str], empty: list[str],
                  skipped: list[dict[str, str]], rows: list[tuple[str, str, str, str]],
                  train: list[CheckedImage], gray: bool, img_size: int,
                  shards: dict[str, Any], manifest_sha256: str, digest: str) -> dict[str, Any]:
    """``dataset.json``: classes, channels, train mean/std, counts, what was left out, the
    split settings, the shards and the digests. Gray only if every kept image is gray."""
    channels = 1 if gray else 3
    mean, std = mean_std(sorted(train, key=lambda c: c.rel), channels)
    counts: dict[str, dict[str, int]] = {s: dict.fromkeys(classes, 0) for s in SPLITS}
    for _, name, split, _ in rows:
        counts[split][name] += 1
    return {
        "format_version": FORMAT_VERSION,
        "source": params.source,
        "classes": classes,
        "channels": channels,
        "mean": mean,
        "std": std,
        "counts": counts,
        "num_images": {**{s: sum(counts[s].values()) for s in SPLITS}, "total": len(rows)},
        "stats_img_size": img_size,
        "skipped": skipped,
        "empty_classes": empty,
        "split": {"seed": params.seed, "val_fraction": params.val_fraction,
                  "test_fraction": params.test_fraction,
                  "max_images_per_class": params.max_images_per_class},
        "shards": {"format": "litdata", "shard_mb": params.shard_mb,
                   "order": params.shard_order, "max_side": params.max_side,
                   "jpeg_quality": params.jpeg_quality if params.max_side else None,
                   "splits": shards},
        "manifest_sha256": manifest_sha256,
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
             f"shards: {prepared.shards_location}"]
    for split in SPLITS:
        lines.append(f"{split:>5}: {len(prepared.split(split))}")
    lines.append("classes: " + ", ".join(prepared.classes))
    if prepared.skipped:
        lines.append(f"skipped {len(prepared.skipped)} unusable file(s)")
    return "\n".join(lines)


def _refusal(what: str, skipped: list[dict[str, str]], empty: list[str]) -> str:
    """The ``bad_images: fail`` message: every problem, listed (the first few), and the fix."""
    lines = []
    if skipped:
        lines.append(f"{len(skipped)} unusable file(s) in {what} (data.bad_images: fail):")
        lines += [f"  {s['path']}: {s['reason']}" for s in skipped[:MAX_BAD_LISTED]]
        if len(skipped) > MAX_BAD_LISTED:
            lines.append(f"  ... and {len(skipped) - MAX_BAD_LISTED} more")
    if empty:
        lines.append(f"{len(empty)} class folder(s) without usable images in {what} "
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
