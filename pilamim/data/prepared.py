"""Read the output of ``prepare`` (``manifest.csv`` + ``dataset.json`` + ``shards/``) back into
Python.

Every later stage starts from :func:`load_prepared`, so it checks what a user can get wrong
(stage not run, output of an older version, manifest edited by hand) and says how to fix it.
The images themselves are read from the shards (:mod:`pilamim.data.shard_reader`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.csv"
SHARDS_DIR = "shards"  # <out_dir>/shards/<split>/: litdata chunks + index.json
DATASET_FILE = "dataset.json"
MANIFEST_COLUMNS = ("path", "label", "split", "sha256")
FORMAT_VERSION = 2  # 2: images in shards; 1 pointed at an image folder


@dataclass(frozen=True)
class Record:
    """One image: ``path`` relative to the data set root (POSIX), class name, split, sha256."""

    path: str
    label: str
    split: str
    sha256: str


@dataclass
class PreparedDataset:
    """A prepared data set: its shards, classes, statistics and split."""

    classes: list[str]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    digest: str
    records: list[Record]
    shards: dict[str, Any] = field(default_factory=dict)  # split -> items, chunks
    location: str | None = None  # s3://.../<digest> when the shards live in S3
    etags: dict[str, str] = field(default_factory=dict)  # "<split>/<file>" -> S3 ETag
    shard_order: str = "path"  # how prepare ordered each split's images (data.shard_order)
    out_dir: Path | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @cached_property
    def class_to_index(self) -> dict[str, int]:
        """Label name -> label index (its position in the sorted ``classes``)."""
        return {name: i for i, name in enumerate(self.classes)}

    def split(self, name: str) -> list[Record]:
        """The records of one split (``train``, ``val`` or ``test``), in manifest order."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; use 'train', 'val' or 'test'")
        return [r for r in self.records if r.split == name]

    @property
    def shards_location(self) -> str:
        return self.location or (str(self.out_dir / "shards") if self.out_dir else "?")

    def label_index(self, record: Record) -> int:
        return self.class_to_index[record.label]


def data_digest(manifest: str, shards: dict[str, Any]) -> str:
    """The identity of a prepared data set: every image (path, class, split, sha256, in the
    manifest) and every shard's bytes (sha256 per chunk). One changed image changes both."""
    content = json.dumps({"manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest(),
                          "shards": shards}, sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()


def load_prepared(out_dir: str | Path) -> PreparedDataset:
    """Load ``<out_dir>/dataset.json`` + ``manifest.csv``; verify they belong together."""
    out_dir = Path(out_dir).expanduser().absolute()
    hint = "run `pilamim prepare` first"
    for name in (DATASET_FILE, MANIFEST_FILE):
        if not (out_dir / name).is_file():
            raise FileNotFoundError(f"prepared data set not found: {out_dir / name} is missing; "
                                    f"{hint} (or point data_dir at its output folder)")
    info = json.loads((out_dir / DATASET_FILE).read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{out_dir / DATASET_FILE} was written by another version of pilamim "
                         f"(format {info.get('format_version')}, this one reads "
                         f"{FORMAT_VERSION}); run `pilamim prepare` again")
    manifest = (out_dir / MANIFEST_FILE).read_bytes()
    shards = info["shards"]["splits"]
    if data_digest(manifest.decode(), shards) != info.get("digest"):
        raise ValueError(f"{out_dir / MANIFEST_FILE} does not match the digest in "
                         f"{DATASET_FILE} (edited or half copied?); {hint} again")
    reader = csv.reader(io.StringIO(manifest.decode(), newline=""))
    header = tuple(next(reader))
    if header != MANIFEST_COLUMNS:
        raise ValueError(f"{out_dir / MANIFEST_FILE}: columns {header}, expected "
                         f"{MANIFEST_COLUMNS}; {hint} again")
    records = [Record(*row) for row in reader]
    return PreparedDataset(
        classes=list(info["classes"]),
        channels=int(info["channels"]),
        mean=tuple(info["mean"]),
        std=tuple(info["std"]),
        digest=info["digest"],
        records=records,
        shards=shards,
        location=info["shards"].get("location"),
        etags=info["shards"].get("etags", {}),
        shard_order=info["shards"].get("order", "path"),
        out_dir=out_dir,
        counts=info.get("counts", {}),
        skipped=info.get("skipped", []),
    )
