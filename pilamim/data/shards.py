"""The prepared images as litdata chunks: one chunk per shard range, written anywhere, read
anywhere.

Why litdata: its chunk format and ``StreamingDataset`` read the same shards from a local
folder or from S3 through a bounded per-node cache, with light dependencies (torch, boto3,
numpy 2.x). Why our own task split instead of ``litdata.optimize``: ``optimize`` deals inputs
to however many workers the machine has, so the chunks (and every hash DVC and MLflow see)
would depend on the core count. Here a shard range is a fixed list of images (planned from the
source's listing by bytes), written by one task as exactly one chunk named after its position
(``chunk-<n>-0.bin``); the same inputs give byte-identical chunks on any machine, any task
runner, in any order, and a killed run redoes only the ranges without a result file.

Each item is ``{"image": file bytes, "label": class name, "path": source path, "sha256"}``:
the file exactly as it was checked (a JPEG stays a JPEG), so the loaders decode exactly what
``prepare`` validated and hashed; with ``data.max_side``, an image larger than that is stored as
a JPEG of that side instead (:mod:`pilamim.data.reencode`; ``sha256`` stays the source file's).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pilamim.data.image_check import CheckedImage, check_bytes
from pilamim.data.reencode import fit_max_side
from pilamim.io import atomic_write_json, atomic_write_text, file_sha256

if TYPE_CHECKING:
    from pilamim.data.source_files import SourceFiles

INDEX_FILE = "index.json"  # litdata's index of a chunk folder
RANK_ENV = "DATA_OPTIMIZER_GLOBAL_RANK"  # litdata names a writer's chunks after this rank
# A writer's chunk limit, the same for every task (litdata's merge wants one config): far above
# any range, so each task's images make exactly one chunk, written when the task is done.
ONE_CHUNK = 1 << 40
_RANK_LOCK = threading.Lock()  # see _as_rank


@dataclass(frozen=True)
class ShardTask:
    """One shard range: the images (``(path, class name)``, in manifest order) of one chunk."""

    split: str
    index: int  # position among the split's shards; names its chunk
    items: tuple[tuple[str, str], ...]
    size: int = 0  # listed bytes of its files

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"


def plan_tasks(split: str, items: list[tuple[str, str]], sizes: list[int],
               shard_bytes: int) -> list[ShardTask]:
    """Cut a split's images (in manifest order) into ranges of about ``shard_bytes`` each.

    Planned from the listed file sizes, never from decoded content, so the plan (and so every
    chunk's bytes) is known before any image is read.
    """
    tasks: list[ShardTask] = []
    start, total = 0, 0
    for end, size in enumerate(sizes, start=1):
        total += size
        if total >= shard_bytes or end == len(items):
            tasks.append(ShardTask(split, len(tasks), tuple(items[start:end]),
                                   sum(sizes[start:end])))
            start, total = end, 0
    return tasks


@dataclass(frozen=True)
class ShardOptions:
    """What every task of one plan does to its images, the same on any machine."""

    img_size: int  # the size mean/std are measured at
    max_side: int | None = None  # re-encode larger images as JPEG of this longer side
    jpeg_quality: int = 90


def chunk_name(task_index: int) -> str:
    return f"chunk-{task_index}-0.bin"


def write_shard(files: SourceFiles, task: ShardTask, split_dir: Path, result_path: Path,
                options: ShardOptions) -> dict[str, Any]:
    """Read, check and hash every image of ``task``; write the usable ones as one chunk; save
    the result (checked images, skipped files, the chunk's name, size and sha256) last, so a
    result file always stands for a complete chunk."""
    from litdata.streaming.writer import BinaryWriter

    skipped: list[dict[str, str]] = []
    checked: list[CheckedImage] = []
    split_dir.mkdir(parents=True, exist_ok=True)
    with _as_rank(task.index):
        # A queue for litdata's one chatty message (the inferred item types), which it would
        # otherwise print once per task.
        writer = BinaryWriter(str(split_dir), chunk_bytes=ONE_CHUNK, msg_queue=queue.Queue())
        if writer.rank != task.index:  # read now and kept: later reads skip the variable
            raise RuntimeError(f"litdata writer has rank {writer.rank}, not {task.index}")
    for rel, label in task.items:
        try:
            data = files.read(rel)  # a DataError (changed since fetch) ends the run
        except OSError as err:
            skipped.append({"path": rel, "reason": f"{type(err).__name__}: {err}"})
            continue
        image = check_bytes(rel, data, skipped, options.img_size)
        if image is not None:
            stored = fit_max_side(data, options.max_side, options.jpeg_quality)
            writer[len(checked)] = {"image": stored, "label": label, "path": rel,
                                    "sha256": image.sha256}
            checked.append(image)
    chunk = None
    if checked:
        # Without the variable, done() writes nothing to a folder that already holds a
        # merged index (a task redone after the merge).
        with _as_rank(task.index):
            writer.done()
        path = split_dir / chunk_name(task.index)
        chunk = {"file": path.name, "bytes": path.stat().st_size,
                 "sha256": file_sha256(path), "items": len(checked)}
    result = {"task": task.name, "chunk": chunk, "skipped": skipped,
              "images": [[c.rel, c.sha256, c.gray, c.pixels, list(c.sums), list(c.squares)]
                         for c in checked]}
    atomic_write_json(result_path, result)
    return result


def read_result(result_path: Path, split_dir: Path) -> dict[str, Any] | None:
    """A finished task's result, or None when it must run (again): no result yet, or its chunk
    is missing or has another size than recorded (killed while a later run rewrote it)."""
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        return None
    chunk = result.get("chunk")
    if chunk is not None:
        path = split_dir / chunk["file"]
        if not path.is_file() or path.stat().st_size != chunk["bytes"]:
            return None
    return result


def checked_images(result: dict[str, Any]) -> list[CheckedImage]:
    return [CheckedImage(rel, sha, gray, pixels, tuple(sums), tuple(squares))
            for rel, sha, gray, pixels, sums, squares in result["images"]]


def finish_split(split_dir: Path, chunks: int, digest: str) -> None:
    """Merge the tasks' chunk indexes into the split's ``index.json`` (litdata's merge, in
    chunk order) and stamp it with the data digest instead of a time: the index is then
    byte-stable, and litdata keys its download cache by that stamp, so a cache never serves
    chunks of another version of the data."""
    from litdata.streaming.writer import BinaryWriter

    index = split_dir / INDEX_FILE
    if not index.is_file():
        previous_rank = os.environ.pop(RANK_ENV, None)
        try:
            BinaryWriter(str(split_dir), chunk_bytes=ONE_CHUNK).merge(num_workers=chunks)
        finally:
            _restore_env(RANK_ENV, previous_rank)
    content = json.loads(index.read_text())
    content["updated_at"] = digest
    atomic_write_text(index, json.dumps(content, sort_keys=True))


def publish(work_shards: Path, out_shards: Path) -> None:
    """Put the finished shard folders in place of the old ones (rename, then drop the old)."""
    out_shards.parent.mkdir(parents=True, exist_ok=True)
    old = out_shards.with_name(f".{out_shards.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_shards.exists():
        os.replace(out_shards, old)
    os.replace(work_shards, out_shards)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _as_rank(index: int) -> Iterator[None]:
    """Set litdata's rank variable while a writer reads it. It is one variable per process,
    and a Dask worker with several threads runs several tasks in one process: each holds it
    only under a lock, or one task's chunk could be named after another's."""
    with _RANK_LOCK:
        previous = os.environ.get(RANK_ENV)
        os.environ[RANK_ENV] = str(index)
        try:
            yield
        finally:
            _restore_env(RANK_ENV, previous)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
