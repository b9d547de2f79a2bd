"""Data mode: the pretraining loop's input pipelines alone (PIL workers, or decoding on the GPU)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.throughput_parts.common import (
    DATA_DEFAULTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PIPELINES,
    STEP_DEFAULTS,
    _resolve_device,
    _sync,
    free_memory,
)
from benchmarks.throughput_parts.jpegs import scan_jpegs


class RepeatedEpochs(torch.utils.data.Sampler):
    """The loop's :class:`EpochSampler` (``(index, seed)`` keys), epoch after epoch, until
    ``total`` samples: a small folder then gives as many batches as a benchmark needs."""

    def __init__(self, size: int, total: int, seed: int = 0) -> None:
        self.size, self.total, self.seed = size, total, seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        from pilamim.train.sampler import EpochSampler

        sampler, epoch, n = EpochSampler(self.size, seed=self.seed), 0, 0
        while True:
            sampler.set_epoch(epoch)
            for key in sampler:
                yield key
                n += 1
                if n >= self.total:
                    return
            epoch += 1

    def __len__(self) -> int:
        return self.total


def shards_of(folder: str) -> Any:
    """The JPEG folder as the pipeline reads data: prepared into shards (all but one image per
    class in the train split), once per folder; later runs load the prepared set."""
    import hashlib
    import tempfile

    from pilamim.config import DataParams
    from pilamim.data.prepare import prepare
    from pilamim.data.prepared import load_prepared

    root = Path(folder).resolve()
    key = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    work = Path(tempfile.gettempdir()) / "pilamim-benchmark-shards" / key
    params = DataParams(source=str(root), raw_dir=str(work / "raw"),
                        out_dir=str(work / "prepared"), val_fraction=0.0, test_fraction=0.01)
    try:
        prepared = load_prepared(params.out_dir)
        if len(prepared.records) == len(scan_jpegs(folder)[0]):
            return prepared
    except (OSError, ValueError):
        pass
    return prepare(params)


def data_loader(s: dict[str, Any], device: torch.device):
    """(DataLoader, function batch -> normalised (B, 3, S, S) float tensor on the device), built
    by the pretraining loop's own :func:`pretrain_input` over the JPEG folder's shards."""
    from torch.utils.data import DataLoader

    from pilamim.data.pretrain_input import pretrain_input

    if s["pipeline"] != "pil" and device.type != "cuda" and s["device"] != "cpu":
        raise RuntimeError(f"pipeline {s['pipeline']!r} decodes on the GPU and no GPU is "
                           "visible (pass --device cpu to exercise it on the CPU, for tests)")
    prepared = shards_of(s["data"])
    prepared.mean, prepared.std = IMAGENET_MEAN, IMAGENET_STD
    source = pretrain_input(prepared, "train", s["img_size"], (0.2, 1.0), True, s["pipeline"],
                            device, cache=False)
    total = (s["batches"] + s["warmup_batches"]) * s["batch"]
    loader = DataLoader(source.dataset, batch_size=s["batch"],
                        sampler=RepeatedEpochs(len(source.dataset), total, s["seed"]),
                        drop_last=True, num_workers=s["workers"],
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        collate_fn=source.collate_fn)
    return loader, source.to_device


def _training(s: dict[str, Any], device: torch.device):
    """The real training step (built as step mode builds it) fed each produced batch, so the
    figure is what ``pilamim pretrain`` would reach on these files: loader and model together."""
    from benchmarks.throughput_parts.step import build_step

    step_setting = {**STEP_DEFAULTS, **s["train"], "batch": s["batch"], "accum": 1,
                    "img_size": s["img_size"], "device": s["device"], "seed": s["seed"]}
    _model, step = build_step(step_setting, device)
    sums = torch.zeros((), device=device)
    at = 0

    def train(x: torch.Tensor) -> None:
        nonlocal sums, at
        sums = sums + step(iter([x]), at).losses["loss"]
        at += 1

    return train, lambda: bool(torch.isfinite(sums).item())


def run_data_setting(s: dict[str, Any]) -> dict[str, Any]:
    s = {**DATA_DEFAULTS, **s}
    if s["pipeline"] not in PIPELINES:
        raise ValueError(f"pipeline {s['pipeline']!r}: one of {PIPELINES}")
    device = _resolve_device(s["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Workers start ``prefetch_factor`` (2) batches each at once; timing fewer batches than are
    # in flight would time work done before the clock started (the first GPU run's 15-worker
    # figure was inflated this way). Warm up through one full round, then time two more. With
    # a training step, its first call (compile) lets the queue fill up: drain it first.
    s["warmup_batches"] = max(s["warmup_batches"], (3 if s["train"] else 2) * s["workers"])
    s["batches"] = max(s["batches"], 4 * s["workers"])
    train, loss_finite = _training(s, device) if s["train"] else (None, None)
    loader, to_device = data_loader(s, device)

    def produce(batch) -> torch.Tensor:
        x = to_device(batch)
        if train is not None:
            train(x)
        return x

    t0 = time.perf_counter()
    batches = iter(loader)
    for _ in range(s["warmup_batches"]):
        produce(next(batches))
    _sync(device)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for _ in range(s["batches"]):
        x = produce(next(batches))
        n += x.shape[0]
    _sync(device)
    elapsed = time.perf_counter() - t0
    x = x.float()
    out = {"device": str(device), "images": n, "seconds": elapsed,
           "images_per_s": n / elapsed, "startup_s": startup, "shape": list(x.shape),
           "batch_mean": float(x.mean()), "batch_std": float(x.std()),
           "cpu_count": os.cpu_count(), "warmup_batches": s["warmup_batches"],
           "timed_batches": s["batches"], "loss_finite": loss_finite() if train else None}
    out["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) / 2**30
                           if device.type == "cuda" else None)
    del batches, loader, x, produce
    train = None  # drops the model before free_memory, so its memory is returned
    if s["train"] and s["train"].get("compile"):
        torch._dynamo.reset()
    free_memory(device)
    return out
