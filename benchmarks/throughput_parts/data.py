"""Data mode: the input pipeline alone, the loop's CPU one or JPEG decoding on the GPU."""

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
    _free,
    _resolve_device,
    _sync,
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


class JpegCrops(torch.utils.data.Dataset):
    """For GPU decoding: a worker reads the file's bytes and draws its RandomResizedCrop box and
    flip from the JPEG header alone, seeded by ``(index, seed)`` like ``ManifestDataset`` (so the
    augmentation stays a function of the sample, whatever the worker)."""

    def __init__(self, paths: list[Path], scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.paths, self.scale, self.ratio = paths, scale, ratio

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        import numpy as np
        from PIL import Image
        from torchvision.transforms import RandomResizedCrop

        from pilamim.data.dataset import augmentation_seed

        index, seed = key
        path = self.paths[index]
        data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
        with Image.open(path) as header, torch.random.fork_rng(devices=[]):
            torch.manual_seed(augmentation_seed(index, seed))
            top, left, h, w = RandomResizedCrop.get_params(header, list(self.scale),
                                                           list(self.ratio))
            flip = bool(torch.rand(1) < 0.5)
        return data, (left, top, left + w, top + h), flip


def collate_jpeg_crops(batch):
    """One packed byte buffer + lengths (one shared-memory transfer per batch), boxes, flips."""
    datas, boxes, flips = zip(*batch, strict=True)
    lengths = torch.tensor([len(d) for d in datas])
    return (torch.cat(datas), lengths, torch.tensor(boxes, dtype=torch.float32),
            torch.tensor(flips))


class GpuCropResize:
    """Decode a batch of JPEGs on the device and crop-resize-flip-normalise it in a few kernels.

    ``method='roi'``: images are gathered into one edge-replicated canvas, then one
    ``torchvision.ops.roi_align`` crops and resizes every box
    (bilinear, averaging ceil(box/out) samples per output pixel: antialiased on downscale; not
    bit-equal to PIL bicubic). ``method='loop'``: per image ``F.interpolate(bicubic,
    antialias=True)`` in a Python loop (torchvision's tensor RandomResizedCrop, exactly).
    """

    def __init__(self, img_size: int, device: torch.device, method: str = "roi",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, max_canvas: int = 2**27) -> None:
        self.size, self.device, self.method, self.max_canvas = img_size, device, method, max_canvas
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def decode(self, buf: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        datas = list(torch.split(buf, lengths.tolist()))
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)

    def __call__(self, buf: torch.Tensor, lengths: torch.Tensor, boxes: torch.Tensor,
                 flips: torch.Tensor) -> torch.Tensor:
        images = self.decode(buf, lengths)
        crops = self._roi(images, boxes) if self.method == "roi" else self._loop(images, boxes)
        flips = flips.to(self.device, non_blocking=True).view(-1, 1, 1, 1)
        crops = torch.where(flips, crops.flip(-1), crops)
        return (crops - self.mean) / self.std

    def _roi(self, images: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        out = torch.empty(len(images), 3, self.size, self.size, device=self.device)
        boxes = boxes.to(self.device, non_blocking=True)
        for chunk in self._chunks(images):
            index = torch.tensor(chunk, device=self.device)
            rois = torch.cat([torch.arange(len(chunk), device=self.device,
                                           dtype=boxes.dtype)[:, None], boxes[index]], dim=1)
            crops = roi_align(self._canvas([images[i] for i in chunk]), rois,
                              (self.size, self.size), spatial_scale=1.0, sampling_ratio=-1,
                              aligned=True)
            out.index_copy_(0, index, crops)
        return out

    def _canvas(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(B, 3, Hmax, Wmax) float, each image top-left, its edge pixels replicated outwards
        (so bilinear samples at a crop's border never see padding): one ``cat`` and three
        gathers, whatever the batch size, instead of a Python loop of copies."""
        dev = self.device
        hs, ws = [im.shape[1] for im in images], [im.shape[2] for im in images]
        flat = torch.cat([im.reshape(-1) for im in images])
        h = torch.tensor(hs, device=dev).view(-1, 1, 1)
        w = torch.tensor(ws, device=dev).view(-1, 1, 1)
        area = h * w
        start = torch.cumsum(3 * area, 0) - 3 * area  # CHW planes, one image after another
        y = torch.minimum(torch.arange(max(hs), device=dev).view(1, -1, 1), h - 1)
        x = torch.minimum(torch.arange(max(ws), device=dev).view(1, 1, -1), w - 1)
        pixel = start + y * w + x
        return torch.stack([flat[pixel + c * area] for c in range(3)], dim=1).float()

    def _chunks(self, images: list[torch.Tensor]) -> list[list[int]]:
        """Groups of similar-sized images whose padded canvas stays under ``max_canvas``."""
        order = sorted(range(len(images)), key=lambda i: images[i].shape[1] * images[i].shape[2])
        chunks: list[list[int]] = []
        current: list[int] = []
        hmax = wmax = 0
        for i in order:
            h, w = images[i].shape[1:]
            nh, nw = max(hmax, h), max(wmax, w)
            if current and (len(current) + 1) * 3 * nh * nw > self.max_canvas:
                chunks.append(current)
                current, nh, nw = [], h, w
            current.append(i)
            hmax, wmax = nh, nw
        return chunks + [current] if current else chunks

    def _loop(self, images: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        out = []
        for img, (x1, y1, x2, y2) in zip(images, boxes.round().int().tolist(), strict=True):
            crop = img[:, y1:y2, x1:x2].unsqueeze(0).float()
            out.append(F.interpolate(crop, size=(self.size, self.size), mode="bicubic",
                                     antialias=True, align_corners=False).clamp_(0, 255))
        return torch.cat(out)


def _data_loader(s: dict[str, Any], device: torch.device):
    """(DataLoader, function batch -> normalised (B, 3, S, S) float tensor on the device)."""
    from torch.utils.data import DataLoader

    paths, labels, classes = scan_jpegs(s["data"])
    total = (s["batches"] + s["warmup_batches"]) * s["batch"]
    sampler = RepeatedEpochs(len(paths), total, s["seed"])
    common = dict(batch_size=s["batch"], sampler=sampler, drop_last=True,
                  num_workers=s["workers"], pin_memory=device.type == "cuda",
                  persistent_workers=False)
    if s["pipeline"] == "cpu":  # what the pretraining loop runs
        from pilamim.data.dataset import ManifestDataset
        from pilamim.data.prepared import PreparedDataset, Record
        from pilamim.data.transforms import pretrain_transform

        root = Path(s["data"]).resolve()
        records = [Record(p.relative_to(root).as_posix(), label, "train", "")
                   for p, label in zip(paths, labels, strict=True)]
        prepared = PreparedDataset(root=root, classes=classes, channels=3, mean=IMAGENET_MEAN,
                                   std=IMAGENET_STD, digest="benchmark", records=records)
        transform = pretrain_transform(s["img_size"], IMAGENET_MEAN, IMAGENET_STD)
        dataset = ManifestDataset(prepared, "train", transform, cache=False)
        loader = DataLoader(dataset, **common)

        def to_device(batch):
            return batch[0].to(device, non_blocking=True)

        return loader, to_device
    if device.type != "cuda" and s["device"] != "cpu":
        raise RuntimeError(f"pipeline {s['pipeline']!r} decodes on the GPU and no GPU is "
                           "visible (pass --device cpu to exercise it on the CPU, for tests)")
    gpu = GpuCropResize(s["img_size"], device, "roi" if s["pipeline"] == "gpu" else "loop")
    loader = DataLoader(JpegCrops(paths), collate_fn=collate_jpeg_crops, **common)
    return loader, lambda batch: gpu(*batch)


def run_data_setting(s: dict[str, Any]) -> dict[str, Any]:
    s = {**DATA_DEFAULTS, **s}
    if s["pipeline"] not in PIPELINES:
        raise ValueError(f"pipeline {s['pipeline']!r}: one of {PIPELINES}")
    device = _resolve_device(s["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Workers start ``prefetch_factor`` (2) batches each at once; timing fewer batches than are
    # in flight would time work done before the clock started (the first GPU run's 15-worker
    # figure was inflated this way). Warm up through one full round, then time two more.
    s["warmup_batches"] = max(s["warmup_batches"], 2 * s["workers"])
    s["batches"] = max(s["batches"], 4 * s["workers"])
    loader, produce = _data_loader(s, device)
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
           "timed_batches": s["batches"]}
    out["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) / 2**30
                           if device.type == "cuda" else None)
    del batches, loader, x
    _free(device)
    return out
