"""Stage ``prepare``: source -> validated images, split, manifest and digest."""

from __future__ import annotations

from typing import Any

from pilamim.config import Params
from pilamim.data.prepare import prepare


def run(params: Params) -> dict[str, Any]:
    prepared = prepare(params.data)
    counts = {s: len(prepared.split(s)) for s in ("train", "val", "test")}
    return {"digest": prepared.digest, "classes": len(prepared.classes),
            "channels": prepared.channels, **{f"{k}_images": v for k, v in counts.items()}}
