"""A local image folder as a source: scanned into an inventory, read in place, never copied.

``fetch`` records every file's size and mtime (:mod:`pilamim.data.inventory`) and ``prepare``
reads the file from the folder itself, refusing one that changed since: copying or hard-linking
a million files into ``raw_dir`` made DVC track a million entries. A source never reaches
outside itself: a symbolic link is followed only when it is a file link whose target stays
inside the source (the resolved target is recorded and read); links pointing outside, broken
links and links to folders (never followed: loops, double counting) are skipped and reported
(:mod:`pilamim.data.fetch_report`). Reads never follow a link either, so a file replaced by a
link after the fetch is refused, not followed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import NamedTuple

from pilamim.data.errors import DataError, plain_parts
from pilamim.data.fetch_report import FetchReport
from pilamim.data.inventory import InventoryFiles, Stamp, class_names, visible, write_inventory

LINK_OUTSIDE = "symbolic link pointing outside the source folder"
LINK_BROKEN = "symbolic link to nothing (broken) or to something that is not a file"
LINK_FOLDER = "symbolic link to a folder (folder links are never followed)"
REFETCH = "run `pilamim fetch` again"


class Found(NamedTuple):
    """A file of the source: where its bytes are (a link's resolved target), size, mtime."""

    path: Path
    size: int
    mtime_ns: int
    link: bool


def local_mirror_name(source: str) -> str:
    """The name of a local source's inventory folder under ``raw_dir``: its last path part,
    which must be a name (``/data/imgs/..`` or ``/`` would make it ``raw_dir`` or above)."""
    name = Path(source).expanduser().absolute().name
    plain_parts(name, f"data.source {source!r}: its last part",
                "name the image folder itself, without a trailing '..' (e.g. /data/images)")
    return name


def fetch_local(folder: Path, dest: Path, source: str) -> FetchReport:
    """Write the inventory of the image folder ``folder`` (``data.source`` is ``source``) into
    ``dest``; return what it leaves out."""
    _refuse_overlap(folder, dest, source)
    files, report = scan_local(folder)
    real_root = folder.resolve()
    rows = [[rel, f.size, f.mtime_ns, *([f.path.relative_to(real_root).as_posix()]
                                        if f.link else [])]
            for rel, f in files.items() if visible(rel)]
    classes = class_names(files)
    if not classes:
        raise DataError(f"data.source {source!r}: {folder} has no class subfolders holding "
                        "files; expected <folder>/<class name>/<image files>.")
    dest.mkdir(parents=True, exist_ok=True)
    write_inventory(dest, {"kind": "local", "folder": str(folder), "classes": classes}, rows)
    return report


def _refuse_overlap(folder: Path, dest: Path, source: str) -> None:
    """Refuse a source folder that holds its inventory folder (or lies inside it): the
    inventory would list itself, and a folder inside ``raw_dir`` is ``fetch``'s output."""
    a, b = folder.resolve(), dest.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise DataError(f"data.source {source!r} ({a}) overlaps its inventory folder {b} under "
                        "raw_dir; keep the images in a folder of their own outside raw_dir")


def scan_local(source: Path) -> tuple[dict[str, Found], FetchReport]:
    """Every file of ``source`` (root-relative POSIX path -> :class:`Found`), and what is left out.

    Folder links are listed, never entered; a file link is kept only when its target is a file
    inside ``source`` (so a source never reaches outside itself). Class folders (non-hidden
    top-level folders) left without any file are reported: an image folder cannot keep them.
    """
    real_root = source.resolve()
    files: dict[str, Found] = {}
    report = FetchReport()
    for dirpath, dirnames, filenames in os.walk(source):  # does not enter linked folders
        here = Path(dirpath)
        dirnames.sort()
        for name in dirnames:
            if (here / name).is_symlink():
                report.skipped.append({"path": _rel(here / name, source), "reason": LINK_FOLDER})
        for name in sorted(filenames):
            path = here / name
            st = path.lstat()
            if not stat.S_ISLNK(st.st_mode):
                if stat.S_ISREG(st.st_mode):
                    files[_rel(path, source)] = Found(path, st.st_size, st.st_mtime_ns, False)
                continue
            target = Path(os.path.realpath(path))  # never raises, even on loops
            reason = _link_problem(target, real_root)
            if reason:
                report.skipped.append({"path": _rel(path, source), "reason": reason})
            else:
                st = target.stat()
                files[_rel(path, source)] = Found(target, st.st_size, st.st_mtime_ns, True)
    filled = {rel.split("/", 1)[0] for rel in files if "/" in rel}
    report.empty_classes = [p.name for p in sorted(source.iterdir())
                            if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
                            and p.name not in filled]
    report.skipped.sort(key=lambda s: s["path"])
    return files, report


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _link_problem(target: Path, real_root: Path) -> str | None:
    """Why a file link resolving to ``target`` may not be read, or None when it may."""
    if target != real_root and real_root not in target.parents:
        return LINK_OUTSIDE
    return None if target.is_file() else LINK_BROKEN


class LocalFiles(InventoryFiles):
    """A fetched local folder: each file read in place, checked against its size and mtime."""

    def __init__(self, root: Path, source: str, stamp: Stamp, header: dict) -> None:
        super().__init__(root, source, stamp)
        folder = Path(source).expanduser().absolute()
        if header.get("folder") != str(folder):
            raise DataError(f"{root} lists {header.get('folder')}, not data.source {source!r} "
                            f"({folder}); {REFETCH}")
        self.folder, self.real_root = folder, folder.resolve()

    def read(self, rel: str) -> bytes:
        size, mtime_ns, *target = self.entry(rel)
        path = self.real_root / target[0] if target else self.folder / rel
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as err:
            raise DataError(f"{path} is gone or no longer a plain file since `pilamim fetch` "
                            f"listed it ({err.strerror}); {REFETCH}") from err
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                raise DataError(f"{path} changed since `pilamim fetch` listed it (size or "
                                f"modification time differ); {REFETCH}")
            data = handle.read()
        if len(data) != size:
            raise DataError(f"{path} changed while being read; {REFETCH}")
        return data
