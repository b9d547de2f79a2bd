"""A folder of ImageNet-like JPEGs (shapes, sizes, quality) to time the input pipeline on."""

from __future__ import annotations

import io
import os
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.throughput_parts.common import JPEG_SUFFIXES


def _jpeg_image(rng, width: int, height: int, noise: int = 12):
    """A random picture with structure (colour field, shapes, texture): ~60 KB at quality 90."""
    import numpy as np
    from PIL import Image, ImageDraw

    low = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3),
                       dtype=np.uint8)
    img = Image.fromarray(low).resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(5, 15))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1 = x0 + int(rng.integers(10, width // 2))
        y1 = y0 + int(rng.integers(10, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    coarse = rng.integers(-noise, noise + 1, ((height + 1) // 2, (width + 1) // 2, 3),
                         dtype=np.int16).repeat(2, 0).repeat(2, 1)[:height, :width]
    fine = rng.integers(-(noise // 2), noise // 2 + 1, (height, width, 1), dtype=np.int16)
    arr = np.clip(np.asarray(img, np.int16) + coarse + fine, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)



# ImageNet's common shapes, roughly in proportion.
_JPEG_SHAPES = ((500, 375),) * 14 + ((375, 500),) * 3 + ((500, 333),) * 2 + ((500, 400),)


def _write_jpeg(job: tuple[int, str, int]) -> int:
    import numpy as np

    index, path, seed = job
    rng = np.random.default_rng((seed, index))
    width, height = _JPEG_SHAPES[int(rng.integers(len(_JPEG_SHAPES)))]
    buf = io.BytesIO()
    _jpeg_image(rng, width, height).save(buf, "JPEG", quality=90)
    Path(path).write_bytes(buf.getvalue())
    return len(buf.getvalue())


def make_jpegs(count: int, root: str | Path, classes: int = 10, seed: int = 0,
               processes: int | None = None) -> dict[str, Any]:
    """Write ``count`` ImageNet-like JPEGs under ``root/<class>/``; existing files are kept."""
    import multiprocessing

    root = Path(root)
    jobs = []
    for i in range(count):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:07d}.JPEG"
        if not path.exists():
            jobs.append((i, str(path), seed))
    t0 = time.perf_counter()
    processes = processes or min(16, os.cpu_count() or 1)
    if len(jobs) > 16 and processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            list(pool.imap_unordered(_write_jpeg, jobs, chunksize=16))
    else:
        for job in jobs:
            _write_jpeg(job)
    files = scan_jpegs(root)[0]
    sizes = [p.stat().st_size for p in files]
    return {"kind": "make_jpegs", "dir": str(root), "images": len(files), "written": len(jobs),
            "mean_kb": statistics.fmean(sizes) / 1e3 if sizes else 0.0,
            "seconds": time.perf_counter() - t0}


def scan_jpegs(root: str | Path) -> tuple[list[Path], list[str], list[str]]:
    """(paths, their class names, sorted classes) of ``root/<class>/*.jpg|jpeg``."""
    root = Path(root)
    paths = sorted(p for p in root.glob("*/*") if p.suffix.lower() in JPEG_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no JPEGs under {root}/<class>/; make some with "
                                f"--make-jpegs N {root}")
    labels = [p.parent.name for p in paths]
    return paths, labels, sorted(set(labels))
