"""Stage ``prepare``: source -> validated images, split, manifest and digest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pilamim.config import Params
from pilamim.data.prepare import prepare
from pilamim.data.prepared import DATASET_FILE, MANIFEST_FILE
from pilamim.loggers import Logger, NullLogger


def run(params: Params, logger: Logger | None = None) -> dict[str, Any]:
    logger = logger or NullLogger()
    # statistics over the images as the model sees them: each resized to its input size
    prepared = prepare(params.data, fetch=False, img_size=params.model.img_size)
    out = Path(params.data.out_dir)
    for name in (DATASET_FILE, MANIFEST_FILE):
        logger.log_artifact(out / name)
    counts = {s: len(prepared.split(s)) for s in ("train", "val", "test")}
    return {"digest": prepared.digest, "classes": len(prepared.classes),
            "channels": prepared.channels, "skipped": len(prepared.skipped),
            **{f"{k}_images": v for k, v in counts.items()}}
