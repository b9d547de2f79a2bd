"""Loader throughput: a per-file baseline that needs nothing of the project, and the
project's own loader over the prepared data. Both decode, resize to 224 and make a tensor,
so the difference is how the bytes are found and read, not the work per image.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.data_scale_parts.common import cpu_seconds

LOADER_SIZE = 224
CACHE_ENV = "PILAMIM_SHARD_CACHE_DIR"  # where the project caches shards read from S3
BATCH = 64


def resize_to_tensor():
    """The per-image work both loaders do: resize to 224 x 224, PIL -> float tensor."""
    from torchvision import transforms as T

    return T.Compose([T.Resize((LOADER_SIZE, LOADER_SIZE)), T.ToTensor()])


class FileDataset:
    """``(tensor, 0)`` per image file: open, decode as RGB, transform. A plain map-style
    dataset (module level, so DataLoader workers can unpickle it)."""

    def __init__(self, files: list[str], transform) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.files[index]) as img:
            return self.transform(img.convert("RGB")), 0


def time_loader(dataset, workers: int, count: int) -> dict[str, Any]:
    """Images/s of a DataLoader over the first ``count`` samples (time to first batch, worker
    start included: that is what an epoch pays)."""
    import torch
    from torch.utils.data import DataLoader, IterableDataset, Subset

    if not isinstance(dataset, IterableDataset):
        dataset = Subset(dataset, range(min(count, len(dataset))))
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers, shuffle=False)
    seen, first = 0, None
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    batches = iter(loader)
    for batch in batches:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        assert isinstance(images, torch.Tensor) and images.shape[-1] == LOADER_SIZE
        seen += images.shape[0]
        first = first or time.perf_counter() - t0
        if seen >= count:
            break
    seconds = time.perf_counter() - t0
    del batches  # joins the workers, so their CPU time is counted
    cpu = cpu_seconds() - cpu0
    return {"workers": workers, "images": seen, "seconds": seconds,
            "img_per_s": seen / seconds if seconds else None, "cpu_s": cpu,
            "img_per_cpu_s": seen / cpu if cpu else None, "first_batch_s": first}


def over_workers(make_dataset: Callable[[str], Any], workers: list[int], count: int,
                 warmup: bool = True) -> dict[str, Any]:
    """One timing per worker count, after one untimed batch in this process (lazy imports and
    first-call set-up would otherwise land on whichever count runs first); the headline
    ``img_per_s`` is the most workers'. ``make_dataset(label)`` gives the dataset of each run
    (a fresh one per run for a cold cache). One torch thread in this process too: with two
    OpenMP threads on 2 busy cores, ``num_workers=0`` ran 10x slower than with one."""
    import torch

    torch.set_num_threads(1)  # as in DataLoader workers; OpenMP threads fight on busy cores
    if warmup:
        time_loader(make_dataset("warmup"), 0, 1)
    runs = [time_loader(make_dataset(f"workers-{w}"), w, count) for w in workers]
    best = runs[-1]
    return {"runs": runs, **{k: best[k] for k in ("images", "seconds", "img_per_s", "cpu_s")}}


def per_file(config: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.data_scale_parts.images import list_images

    files = list_images(Path(config["images_dir"]))[: config["count"]]
    dataset = FileDataset(files, resize_to_tensor())
    return over_workers(lambda _: dataset, config["workers"], config["count"])


def project_loader(config: dict[str, Any]) -> dict[str, Any]:
    """``ManifestDataset(load_prepared(out_dir), "train", transform)`` as the stages build it;
    caching decoded images is turned off where the class still offers it (one pass over the
    data would only fill memory). ``pilamim`` is imported from the project copy, the code
    that wrote the prepared data, not from this checkout. With ``cold`` (shards in S3) each
    run gets a fresh dataset and an empty shard cache of its own, so every run downloads."""
    import sys

    if "pilamim" in sys.modules:
        raise RuntimeError("pilamim was imported before the project copy was put on sys.path")
    sys.path.insert(0, config["project"])
    from pilamim.data.dataset import ManifestDataset
    from pilamim.data.prepared import load_prepared

    prepared = load_prepared(config["prepared_dir"])
    kwargs = {}
    if "cache" in inspect.signature(ManifestDataset).parameters:
        kwargs["cache"] = False
    cache_root = Path(config["cache_root"]) if config.get("cold") else None

    def make_dataset(label: str):
        if cache_root is not None:
            os.environ[CACHE_ENV] = str(cache_root / label)
        return ManifestDataset(prepared, "train", resize_to_tensor(), **kwargs)

    dataset = make_dataset("warmup")
    make = make_dataset if cache_root is not None else (lambda _: dataset)
    out = over_workers(make, config["workers"], config["count"], config.get("warmup", True))
    if cache_root is not None:
        for run in out["runs"]:
            run["downloaded_mb"] = _folder_mb(cache_root / f"workers-{run['workers']}")
    return {**out, "split_images": _length(dataset), "dataset_kwargs": kwargs,
            "cold_cache": cache_root is not None,
            "bytes_only_1proc": (_bytes_only(make("bytes-only"), config["count"])
                                 if config.get("bytes_only", True) else None),
            "pilamim_from": str(Path(inspect.getfile(ManifestDataset)).parent.parent)}


def _bytes_only(dataset, count: int) -> dict[str, Any] | None:
    """Images/s of reading the encoded bytes alone from the shards, in this process: the CPU
    side of the GPU-decode pipeline (``input_pipeline: device``). None if the dataset has no
    ``shards.read`` (the API is the project's and may move)."""
    read = getattr(getattr(dataset, "shards", None), "read", None)
    if read is None:
        return None
    n = min(count, len(dataset))
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    nbytes = sum(len(read(i)) for i in range(n))
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return {"images": n, "seconds": seconds, "img_per_s": n / seconds, "cpu_s": cpu,
            "img_per_cpu_s": n / cpu if cpu else None, "mb_per_s": nbytes / 1e6 / seconds}


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def _length(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None
