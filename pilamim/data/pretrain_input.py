"""The pretraining loop's input: which dataset the loader reads, and how a batch reaches the
device. One function, so the loop and ``benchmarks/throughput.py --data`` run the same path."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

import torch
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from pilamim.config import InputPipeline
from pilamim.data.dataset import ManifestDataset
from pilamim.data.device_decode import DeviceCropResize, EncodedCrops, collate_encoded
from pilamim.data.memory_split import collate_batch, memory_split
from pilamim.data.prepared import PreparedDataset
from pilamim.data.transforms import pretrain_transform

PIPELINES: tuple[str, ...] = get_args(InputPipeline)
# The pipelines that decode a folder of files of any size (benchmarks/throughput.py --data).
FILE_PIPELINES: tuple[str, ...] = ("pil", "device", "device_bicubic")


@dataclass
class PretrainInput:
    dataset: Dataset
    collate_fn: Callable[[list], Any]
    to_device: Callable[[Any], torch.Tensor]  # a loader batch -> normalised images on device


def pretrain_input(prepared: PreparedDataset, split: str, img_size: int,
                   crop_scale: tuple[float, float], hflip: bool, pipeline: InputPipeline,
                   device: torch.device, cache: bool | None = None) -> PretrainInput:
    """``memory``: the split decoded once, flips and normalisation on the batch
    (:mod:`pilamim.data.memory_split`; only where that equals ``pil``); ``pil``: workers decode
    with PIL and run ``pretrain_transform`` (MAE's bicubic crop); ``device``/``device_bicubic``:
    workers read bytes, the device decodes and crops (see :mod:`pilamim.data.device_decode`);
    ``auto``: ``memory`` where it applies, else ``pil``. ``cache`` applies to ``pil`` only."""

    def to_device(batch: Any) -> torch.Tensor:
        return batch[0].to(device, non_blocking=True)

    if pipeline in ("auto", "memory"):
        whole = tuple(crop_scale) == (1.0, 1.0)
        source = ManifestDataset(prepared, split, cache=False)
        split_in_memory = memory_split(source, img_size, prepared.mean, prepared.std,
                                       0.5 if hflip else 0.0) if whole else None
        if split_in_memory is not None:
            return PretrainInput(split_in_memory, collate_batch, to_device)
        if pipeline == "memory":
            raise ValueError(
                f"pretrain.input_pipeline: memory needs crop_scale (1, 1) (got {crop_scale}), "
                f"every {split} image {img_size} px square and the split under "
                "memory_split.MEMORY_SPLIT_MAX_BYTES; set input_pipeline: pil (or auto)")
        pipeline = "pil"
    if pipeline == "pil":
        transform = pretrain_transform(img_size, prepared.mean, prepared.std, crop_scale, hflip)
        dataset = ManifestDataset(prepared, split, transform, cache=cache)
        return PretrainInput(dataset, default_collate, to_device)
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline {pipeline!r}: one of {PIPELINES}")
    crop = DeviceCropResize(img_size, prepared.channels, prepared.mean, prepared.std, device,
                            "roi_align" if pipeline == "device" else "bicubic")
    return PretrainInput(EncodedCrops(prepared, split, crop_scale, hflip), collate_encoded, crop)
