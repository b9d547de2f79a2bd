"""Stage ``fetch``: materialise the data source as an image folder under ``raw_dir``.

Kept apart from ``prepare`` so DVC versions the raw images as this stage's output (and can
push them to a remote) while ``prepare`` only validates, splits and hashes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pilamim.config import Params
from pilamim.data.sources import check_image_root, materialize
from pilamim.loggers import Logger


def run(params: Params, logger: Logger | None = None) -> dict[str, Any]:
    root = materialize(params.data)
    classes = check_image_root(root, params.data.source)
    files = sum(1 for p in Path(root).rglob("*") if p.is_file() and not p.name.startswith("."))
    return {"root": str(root), "classes": len(classes), "files": files}
