"""What a source holds but its inventory leaves out, written beside the inventory.

A local folder's links that lead outside it (or nowhere, or to a folder) and class folders
without any file (which an image folder cannot carry) are not listed; S3 reports the empty
classes. The fetch writes them to ``<inventory folder>/.pilamim-fetch.json`` and ``prepare``
reads that file back, lists it in ``dataset.json`` and, with ``bad_images: fail``, refuses it.
The fetch itself never looks at ``bad_images``: the ``fetch`` stage does not depend on that
setting, so its output must not either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pilamim.data.errors import check_inside
from pilamim.io import atomic_write_json

FETCH_REPORT = ".pilamim-fetch.json"


@dataclass
class FetchReport:
    """What a source holds that its inventory leaves out; ``prepare`` reports (or refuses) it.

    ``skipped`` entries look like ``prepare``'s own (``{"path", "reason"}``, paths relative to
    the source) so ``dataset.json`` lists both kinds in one place.
    """

    skipped: list[dict[str, str]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)


def save_fetch_report(root: Path, report: FetchReport) -> None:
    """Write ``report`` beside the inventory, only when it changed (a rerun leaves data/raw
    alone); a link found in its place is replaced, never written through."""
    path = check_inside(root / FETCH_REPORT, root, "write")
    if path.is_symlink() or not path.is_file() or read_fetch_report(root) != report:
        atomic_write_json(path, {"skipped": report.skipped,
                                 "empty_classes": report.empty_classes})


def read_fetch_report(root: Path) -> FetchReport:
    """The :class:`FetchReport` a local or S3 fetch left in ``root`` (empty if none)."""
    try:
        saved = json.loads((root / FETCH_REPORT).read_text())
    except (OSError, ValueError):
        return FetchReport()
    return FetchReport(list(saved.get("skipped", [])), list(saved.get("empty_classes", [])))
