"""The fetch stage's record of a source: every file ``prepare`` will read, and what identifies it.

A million-image source cannot be mirrored into ``raw_dir``: DVC would track one entry per file
(minutes to hours) and an S3 set would be copied whole onto every machine. So ``fetch`` writes
one small file per source instead, ``<image root>/.pilamim-inventory.jsonl``, and ``prepare``
reads each image from the source itself, refusing one whose recorded identity (size and mtime,
an ETag, the bundled set's fingerprint) no longer matches. DVC versions the inventory, so a
changed source is a changed ``fetch`` output, and an unchanged one is byte-identical.

Format, JSON lines: the first line is a header object (``format``, ``kind``, ``classes``,
``blocks``, and what the kind needs to find and check its files); then one JSON array per file,
sorted by path: ``[path, size, *kind fields]``, ``path`` root-relative POSIX. Only files
``prepare`` reads are listed (non-hidden, in non-hidden folders, below a class folder);
``classes`` are the non-hidden top-level folders holding any file, as an image folder would
have them; ``blocks`` maps each class with listed files to the ``[start, end)`` byte range of
its lines, counted from the end of the header line. Nothing else (no time stamps but the
recorded mtimes) is written, and the file is replaced only when its bytes change.

Implementations of :class:`pilamim.data.source_files.SourceFiles` build on
:class:`InventoryFiles`: they pickle without the parsed listing, and each process parses only
the classes it touches (``prepare``'s shard ranges are contiguous in path order, so a worker
holds a few classes of a million-file listing, not all of it), once, checking every time that
the file is still the one first opened.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pilamim.data.errors import DataError, check_inside
from pilamim.data.fetch_report import FetchReport, read_fetch_report
from pilamim.io import atomic_write

INVENTORY = ".pilamim-inventory.jsonl"
FORMAT = 1

Stamp = tuple[int, int, int]  # (inode, size, mtime_ns) of the inventory file as first read


def visible(rel: str) -> bool:
    """Whether ``prepare`` reads this root-relative path: inside a class folder, nothing hidden."""
    parts = rel.split("/")
    return len(parts) > 1 and not any(part.startswith(".") for part in parts)


def class_names(rels: Iterable[str]) -> list[str]:
    """The class folders an image folder holding ``rels`` has: non-hidden, holding any file."""
    return sorted({rel.split("/", 1)[0] for rel in rels
                   if "/" in rel and not rel.startswith(".")})


def write_inventory(root: Path, header: dict[str, Any], rows: list[list[Any]]) -> bool:
    """Write ``root``'s inventory unless it already holds these bytes; True when written.

    ``rows`` are ``[path, size, ...]``; they are written sorted by path.
    """
    lines: list[str] = []
    blocks: dict[str, list[int]] = {}
    offset = 0
    for row in sorted(rows, key=lambda r: r[0]):
        line = _line(row)  # ASCII: one character, one byte
        block = blocks.setdefault(row[0].split("/", 1)[0], [offset, offset])
        offset += len(line)
        block[1] = offset
        lines.append(line)
    text = "".join([_line({"format": FORMAT, **header, "blocks": blocks}), *lines])
    path = check_inside(root / INVENTORY, root, "write")
    try:
        if not path.is_symlink() and path.read_bytes() == text.encode():
            return False
    except OSError:
        pass
    atomic_write(path, lambda tmp: _write_readable(tmp, text))
    return True


def _write_readable(tmp: Path, text: str) -> None:
    tmp.write_text(text, encoding="ascii")
    tmp.chmod(0o644)  # a temp file is private; data under raw_dir is for every user to read


def _line(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=True) + "\n"


def read_header(path: Path) -> tuple[Stamp, dict[str, Any]]:
    """The inventory's header and stamp; FileNotFoundError when ``fetch`` has not written one."""
    try:
        with open(path, "rb") as handle:
            stamp = _stamp(os.fstat(handle.fileno()))
            header = _parse_header(path, handle.readline())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path.parent} holds no inventory ({INVENTORY}): "
                                "run `pilamim fetch` first") from err
    return stamp, header


def _stamp(st: os.stat_result) -> Stamp:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _parse_header(path: Path, line: bytes) -> dict[str, Any]:
    try:
        header = json.loads(line)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise DataError(f"{path} is not an inventory this pilamim reads; "
                        "run `pilamim fetch` again")
    return header


class Inventory:
    """One process's view of an inventory file: its header, and the classes parsed so far.

    Every read of the file checks it is still the one stamped ``stamp`` (a fetch replacing it
    while ``prepare`` reads would otherwise mix two listings).
    """

    def __init__(self, path: Path, stamp: Stamp) -> None:
        self.path, self.stamp = path, stamp
        first = self._read(lambda handle: handle.readline())
        self.header, self.body = _parse_header(path, first), len(first)  # body: its offset
        self._classes: dict[str, dict[str, tuple[Any, ...]]] = {}

    def entries(self, class_name: str) -> dict[str, tuple[Any, ...]]:
        """``path -> (size, *kind fields)`` for one class, in path order."""
        if class_name not in self._classes:
            start, end = self.header["blocks"].get(class_name, (0, 0))

            def parse(handle) -> dict[str, tuple[Any, ...]]:
                handle.seek(self.body + start)
                rows = (json.loads(line) for line in handle.read(end - start).splitlines())
                return {rel: tuple(fields) for rel, *fields in rows}

            self._classes[class_name] = self._read(parse) if end > start else {}
        return self._classes[class_name]

    def _read(self, parse):
        replaced = DataError(f"{self.path} was replaced or removed while in use (another "
                             "`pilamim fetch`?); run `pilamim prepare` again")
        try:
            with open(self.path, "rb") as handle:
                if _stamp(os.fstat(handle.fileno())) != self.stamp:
                    raise replaced
                return parse(handle)
        except FileNotFoundError as err:
            raise replaced from err


_LOADED: dict[str, Inventory] = {}  # per process: the last one opened per path


def load_inventory(path: Path, stamp: Stamp) -> Inventory:
    """The inventory at ``path`` as this process sees it (one per path and stamp)."""
    cached = _LOADED.get(str(path))
    if cached is None or cached.stamp != stamp:
        cached = _LOADED[str(path)] = Inventory(path, stamp)
    return cached


class InventoryFiles:
    """What every source kind shares: listing, sizes and report from the fetched inventory.

    Subclasses add ``read``. Pickled state is the paths and the stamp, never the parsed
    listing nor a client: those are made again, lazily, in the process that uses them.
    """

    _per_process: tuple[str, ...] = ()  # attributes that never leave the process

    def __init__(self, root: Path, source: str, stamp: Stamp) -> None:
        self.root, self.source, self.stamp = Path(root), source, stamp

    @property
    def inventory(self) -> Inventory:
        return load_inventory(self.root / INVENTORY, self.stamp)

    def classes(self) -> list[str]:
        return list(self.inventory.header["classes"])

    def files(self, class_name: str) -> list[str]:
        return list(self.inventory.entries(class_name))

    def size(self, rel: str) -> int:
        return int(self.entry(rel)[0])

    def report(self) -> FetchReport:
        return read_fetch_report(self.root)

    def entry(self, rel: str) -> tuple[Any, ...]:
        """``(size, *kind fields)`` of ``rel``; DataError if the fetch did not list it."""
        found = self.inventory.entries(rel.split("/", 1)[0]).get(rel)
        if found is None:
            raise DataError(f"{rel} is not in {self.root / INVENTORY} (data.source "
                            f"{self.source!r}); run `pilamim fetch` again")
        return found

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._per_process}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name in self._per_process:
            setattr(self, name, None)
