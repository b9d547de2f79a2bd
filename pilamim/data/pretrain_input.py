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
from pilamim.data.prepared import PreparedDataset
from pilamim.data.transforms import pretrain_transform

PIPELINES: tuple[str, ...] = get_args(InputPipeline)


@dataclass
class PretrainInput:
    dataset: Dataset
    collate_fn: Callable[[list], Any]
    to_device: Callable[[Any], torch.Tensor]  # a loader batch -> normalised images on device


def pretrain_input(prepared: PreparedDataset, split: str, img_size: int,
                   crop_scale: tuple[float, float], hflip: bool, pipeline: InputPipeline,
                   device: torch.device, cache: bool | None = None) -> PretrainInput:
    """``pil``: workers decode with PIL and run ``pretrain_transform`` (MAE's bicubic crop);
    ``device``/``device_bicubic``: workers read bytes, the device decodes and crops
    (see :mod:`pilamim.data.device_decode`). ``cache`` applies to ``pil`` only."""
    if pipeline == "pil":
        transform = pretrain_transform(img_size, prepared.mean, prepared.std, crop_scale, hflip)
        dataset = ManifestDataset(prepared, split, transform, cache=cache)
        return PretrainInput(dataset, default_collate,
                             lambda batch: batch[0].to(device, non_blocking=True))
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline {pipeline!r}: one of {PIPELINES}")
    crop = DeviceCropResize(img_size, prepared.channels, prepared.mean, prepared.std, device,
                            "roi_align" if pipeline == "device" else "bicubic")
    return PretrainInput(EncodedCrops(prepared, split, crop_scale, hflip), collate_encoded, crop)
