"""Mirror a local image folder into ``raw_dir`` by hard links, never reaching outside either.

Every source lands under ``raw_dir`` so the ``fetch`` stage's one DVC output versions exactly
the images that were used; for a local folder that is a mirror of hard links (a copy across
file systems). A source never reaches outside itself, and the mirror never writes or deletes
outside its own folder: every write and delete is checked against the resolved mirror folder
(:func:`pilamim.data.errors.check_inside`), and a symbolic link in the source is followed only
when it is a file link whose target stays inside the source (then the target's bytes are
mirrored). Links pointing outside, broken links and links to folders (never followed: loops,
double counting) are skipped and reported (:mod:`pilamim.data.fetch_report`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pilamim.data.errors import DataError, check_inside, plain_parts
from pilamim.data.fetch_report import FETCH_REPORT, FetchReport

LINK_OUTSIDE = "symbolic link pointing outside the source folder"
LINK_BROKEN = "symbolic link to nothing (broken) or to something that is not a file"
LINK_FOLDER = "symbolic link to a folder (folder links are never followed)"


def local_mirror_name(source: str) -> str:
    """The mirror folder name of a local source: its last path part, which must be a name.

    ``/data/imgs/..`` or ``/`` would otherwise make the mirror folder ``raw_dir`` itself (or its
    parent), and mirroring deletes whatever there is not in the source.
    """
    name = Path(source).expanduser().absolute().name
    plain_parts(name, f"data.source {source!r}: its last part",
                "name the image folder itself, without a trailing '..' (e.g. /data/images)")
    return name


def materialize_local(folder: Path, dest: Path, source: str) -> FetchReport:
    """Mirror the image folder ``folder`` (``data.source`` is ``source``) into ``dest``; return
    what the mirror leaves out."""
    _refuse_overlap(folder, dest, source)
    files, report = scan_local(folder)
    _mirror_local(files, dest)
    return report


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
