"""A synthetic image folder of any size, and the decode + verify ceiling over it.

The images start from the bundled Fashion-MNIST subset (12,000 gray 28 px pictures in 10
classes), so the classes are real and ``prepare`` sees an ordinary image folder. Each file is
upscaled to ``size`` px, randomly cropped and shifted, coloured (foreground and background
colours, brightness, contrast), flipped and lightly noised by a generator seeded with
``(seed, index)``: every file differs, the set is the same on every run, and JPEG sizes are
closer to photographs' than a smooth upscale's would be.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.data_scale_parts.common import cpu_seconds

SUBSET = Path(__file__).resolve().parents[2] / "pilamim/data/embedded/fashion_mnist_subset.npz"
JPEG_QUALITY = 90
CHUNK = 256  # files per task: few enough round trips, small enough to spread over the cores
SPEC_FILE = "images.json"  # beside the folder, never inside it (it is not an image)

_subset: tuple[list[str], np.ndarray, np.ndarray] | None = None


def load_subset() -> tuple[list[str], np.ndarray, np.ndarray]:
    """(class names, gray images, labels) of the bundled subset, train and test together;
    loaded once per process (each pool worker loads its own copy)."""
    global _subset
    if _subset is None:
        with np.load(SUBSET) as z:
            classes = [str(c) for c in z["classes"]]
            images = np.concatenate([z["train_images"], z["test_images"]])
            labels = np.concatenate([z["train_labels"], z["test_labels"]])
        _subset = classes, images, labels
    return _subset


def image_path(root: Path, classes: list[str], label: int, index: int) -> Path:
    return root / classes[label] / f"{index:08d}.jpg"


def synthetic_jpeg(gray: np.ndarray, size: int, rng: np.random.Generator) -> bytes:
    """One 28 px gray picture as a varied ``size`` px RGB JPEG."""
    from PIL import Image

    scale = size * rng.uniform(1.0, 1.3)  # upscale a little beyond size, then crop (a shift)
    big = int(round(scale))
    img = Image.fromarray(gray).resize((big, big), Image.BICUBIC)
    x0, y0 = (int(v) for v in rng.integers(0, big - size + 1, 2))
    g = np.asarray(img.crop((x0, y0, x0 + size, y0 + size)), np.float32)[..., None] / 255.0
    fg, bg = rng.uniform(40, 255, 3), rng.uniform(0, 120, 3)
    rgb = bg + (fg - bg) * g  # gray -> a two-colour picture
    rgb = (rgb - 128.0) * rng.uniform(0.8, 1.2) + 128.0 + rng.uniform(-20, 20)  # contrast, light
    rgb += rng.normal(0.0, 4.0, rgb.shape)  # sensor-like noise: files differ, sizes realistic
    if rng.random() < 0.5:
        rgb = rgb[:, ::-1]
    out = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _write_range(job: tuple[str, int, int, int, int]) -> tuple[int, int]:
    """Write images ``start..stop-1`` that are missing; (files written, bytes written)."""
    root_text, start, stop, size, seed = job
    root = Path(root_text)
    classes, images, labels = load_subset()
    written = nbytes = 0
    for index in range(start, stop):
        pick = index % len(images)
        path = image_path(root, classes, int(labels[pick]), index)
        if path.exists():
            continue
        data = synthetic_jpeg(images[pick], size, np.random.default_rng((seed, index)))
        path.write_bytes(data)
        written, nbytes = written + 1, nbytes + len(data)
    return written, nbytes


def make_images(root: Path, count: int, size: int, seed: int = 0,
                processes: int | None = None) -> dict[str, Any]:
    """Write ``count`` JPEGs into ``root/<class>/`` on all cores. Files already there are kept
    when the folder was made with the same size and seed (a ``--keep`` workdir reused), so
    only missing ones are written; otherwise the folder must be empty."""
    spec = {"size": size, "seed": seed, "quality": JPEG_QUALITY}
    spec_path = root.parent / SPEC_FILE
    if root.exists() and any(root.iterdir()):
        old = json.loads(spec_path.read_text()) if spec_path.exists() else None
        if old != spec:
            raise RuntimeError(f"{root} holds images made with {old}, not {spec}: "
                               "use another --workdir")
    root.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    classes = load_subset()[0]
    for name in classes:
        (root / name).mkdir(exist_ok=True)
    jobs = [(str(root), s, min(s + CHUNK, count), size, seed) for s in range(0, count, CHUNK)]
    processes = processes or os.cpu_count() or 1
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        done = pool.map(_write_range, jobs, chunksize=1)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    written, nbytes = sum(d[0] for d in done), sum(d[1] for d in done)
    files = list_images(root)
    sizes = [os.stat(p).st_size for p in files]
    return {"images": written, "images_in_folder": len(files), "processes": processes,
            "seconds": seconds, "img_per_s": written / seconds if written else None,
            "cpu_s": cpu,
            "written_mb": nbytes / 1e6, "total_mb": sum(sizes) / 1e6,
            "mean_kb": statistics.fmean(sizes) / 1e3 if sizes else 0.0, "size_px": size}


def list_images(root: Path) -> list[str]:
    """Every image file under ``root/<class>/``, sorted (plain strings: fast at 1M files)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
    return sorted(found)


def _decode_chunk(paths: list[str]) -> tuple[int, int]:
    """Read, hash and fully decode each file: what validating an image costs at the least."""
    from PIL import Image

    nbytes = 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        nbytes += len(data)
    return len(paths), nbytes


def decode_ceiling(files: list[str], processes: int) -> dict[str, Any]:
    """``_decode_chunk`` over ``files`` on one process (in this one) or a pool of them."""
    chunks = [files[i:i + CHUNK] for i in range(0, len(files), CHUNK)]
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    if processes == 1:
        done = [_decode_chunk(c) for c in chunks]
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            done = pool.map(_decode_chunk, chunks, chunksize=1)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    count, nbytes = sum(d[0] for d in done), sum(d[1] for d in done)
    return {"images": count, "processes": processes, "seconds": seconds, "cpu_s": cpu,
            "img_per_s": count / seconds, "img_per_s_per_process": count / seconds / processes,
            "mb_per_s": nbytes / 1e6 / seconds}
