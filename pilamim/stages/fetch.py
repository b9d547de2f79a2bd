"""Stage ``fetch``: record the data source's inventory (every image file, and what identifies
its bytes) under ``raw_dir``.

Kept apart from ``prepare`` so DVC versions what the source held as this stage's output: a
few small files however many images there are (no image is copied), while ``prepare`` reads
each image from the source itself and refuses one that changed since.
"""

from __future__ import annotations

from typing import Any

from pilamim.config import Params
from pilamim.data.source_files import open_files
from pilamim.data.sources import materialize
from pilamim.loggers import Logger


def run(params: Params, logger: Logger | None = None) -> dict[str, Any]:
    root = materialize(params.data)
    files = open_files(params.data)
    classes = files.classes()
    return {"root": str(root), "classes": len(classes),
            "files": sum(len(files.files(name)) for name in classes)}
