"""Turn ``DataParams.source`` into an inventory under ``raw_dir``: what ``prepare`` will read.

Three kinds of source, one result (:mod:`pilamim.data.inventory`, read back through
:func:`pilamim.data.source_files.open_files`) so ``prepare`` never cares where images come
from, and nothing is copied: ``fetch`` used to mirror every image under ``raw_dir``, which DVC
cannot track at a million files and which copied whole S3 sets onto every machine.

- ``embedded``: the bundled Fashion-MNIST subset (or, with ``embedded_idx_dir``, the full IDX
  files), listed into ``<raw_dir>/fashion-mnist`` (``<raw_dir>/fashion-mnist-full``); the PNGs
  are encoded when read (:mod:`pilamim.data.embedded_source`).
- a local folder, listed into ``<raw_dir>/local/<name>`` (:mod:`pilamim.data.local_source`).
- ``s3://bucket/prefix``, listed into ``<raw_dir>/s3/<bucket>/<prefix>``
  (:mod:`pilamim.data.s3_source`).

Names joined under ``raw_dir`` must be plain (:func:`pilamim.data.errors.plain_parts`), so an
inventory never lands outside it. What a source holds but its inventory leaves out is logged
as a warning here and kept beside the inventory (:mod:`pilamim.data.fetch_report`). Refetching
an unchanged source rewrites nothing, so DVC sees the ``fetch`` output unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pilamim.config import DataParams
from pilamim.data.embedded_source import encode_gray_png, fetch_embedded
from pilamim.data.errors import DataError
from pilamim.data.fetch_report import FetchReport, save_fetch_report
from pilamim.data.inventory import INVENTORY
from pilamim.data.local_source import fetch_local, local_mirror_name
from pilamim.data.s3_source import fetch_s3, parse_s3_uri

__all__ = ["check_image_root", "encode_gray_png", "image_root", "materialize", "source_kind"]

log = logging.getLogger(__name__)

EMBEDDED_DIR = "fashion-mnist"
EMBEDDED_FULL_DIR = "fashion-mnist-full"


def source_kind(source: str) -> str:
    """``embedded``, ``s3`` or ``local``."""
    source = source.strip()
    return "embedded" if source == "embedded" else "s3" if source.startswith("s3://") else "local"


def image_root(params: DataParams) -> Path:
    """The folder under ``raw_dir`` where ``materialize`` writes the inventory of
    ``params.source`` (one folder per source, so switching sources keeps each fetch)."""
    source = params.source.strip()
    raw_dir = Path(params.raw_dir).expanduser().absolute()
    kind = source_kind(source)
    if kind == "embedded":
        return raw_dir / (EMBEDDED_FULL_DIR if params.embedded_idx_dir else EMBEDDED_DIR)
    if kind == "s3":
        bucket, prefix = parse_s3_uri(source)
        return raw_dir / "s3" / bucket / prefix if prefix else raw_dir / "s3" / bucket
    return raw_dir / "local" / local_mirror_name(source)


def materialize(params: DataParams) -> Path:
    """Write the inventory of ``params.source`` into :func:`image_root` (idempotent: an
    unchanged source rewrites nothing); return that folder. Nothing is downloaded or copied."""
    source = params.source.strip()
    root = image_root(params)  # refuses bad names before anything is written
    kind = source_kind(source)
    if kind == "embedded":
        idx_dir = params.embedded_idx_dir
        fetch_embedded(Path(idx_dir).expanduser() if idx_dir else None, root)
    else:
        if kind == "s3":
            report = FetchReport(empty_classes=fetch_s3(source, root))
        else:
            folder = Path(source).expanduser().absolute()
            check_image_root(folder, source)
            report = fetch_local(folder, root, source)
        _warn(report, source)
        save_fetch_report(root, report)
    _note_old_mirror(root)
    return root


def _warn(report: FetchReport, source: str) -> None:
    for entry in report.skipped:
        log.warning("data.source %s: leaving out %s: %s", source, entry["path"], entry["reason"])
    if report.empty_classes:
        log.warning("data.source %s: class folder(s) without any file: %s", source,
                    ", ".join(report.empty_classes))


def _note_old_mirror(root: Path) -> None:
    """Point out image folders an older ``pilamim fetch`` mirrored here: nothing reads them."""
    old = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                 and not (p / INVENTORY).exists())  # not another source's inventory folder
    if old:
        log.warning("%s still holds image folders from an older `pilamim fetch` (%s%s); "
                    "nothing reads them any more: delete them to free the space", root,
                    ", ".join(old[:3]), ", ..." if len(old) > 3 else "")


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
