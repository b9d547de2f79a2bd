"""Pretraining input on the training device: loader workers only read bytes.

Why: PIL decoding plus a bicubic RandomResizedCrop per image costs a CPU core about 100 ImageNet
images/s, so 16 cores feed ~1,300 images/s while the compiled ViT-B/16 step trains ~3,500.
Here a worker reads a file's bytes and draws its crop box and flip from the header alone, with
the same seeded draws as :func:`~pilamim.data.transforms.pretrain_transform` (so every sample's
crop geometry is the PIL pipeline's); the main process decodes the batch on the device (nvJPEG
on CUDA) and crops, resizes, flips and normalises it in a few kernels.

Resampling differs from PIL's bicubic: ``roi_align`` (bilinear, averaging ceil(box/out)
samples per output pixel, i.e. antialiased on downscale) is one kernel for the batch and lands
within ~0.015 of PIL in normalised units; ``bicubic`` runs torch's antialiased bicubic per
image and lands within ~0.005.
"""

from __future__ import annotations

import io
from typing import Literal, get_args

import numpy as np
import torch
from torch.utils.data import Dataset

from pilamim.data.bit_depth import tensor_to_8bit, to_8bit
from pilamim.data.dataset import augmentation_seed
from pilamim.data.prepared import PreparedDataset
from pilamim.data.shard_reader import ShardReader

Resize = Literal["roi_align", "bicubic"]
JPEG_MAGIC = b"\xff\xd8"
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect range, as in pretrain_transform


class EncodedCrops(Dataset):
    """``(index, seed)`` -> (file bytes, crop box ``(x1, y1, x2, y2)``, flip, label)."""

    def __init__(self, prepared: PreparedDataset, split: str,
                 crop_scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True) -> None:
        records = prepared.split(split)
        self.shards = ShardReader(prepared, split)
        self.labels = [prepared.label_index(r) for r in records]
        self.crop_scale, self.hflip = list(crop_scale), hflip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]):
        from PIL import Image
        from torchvision.transforms import RandomResizedCrop

        index, seed = key
        raw = self.shards.read(index)
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        # The same draws, in the same order, as RandomResizedCrop + RandomHorizontalFlip.
        with Image.open(io.BytesIO(raw)) as header, torch.random.fork_rng(devices=[]):
            torch.manual_seed(augmentation_seed(index, seed))
            top, left, h, w = RandomResizedCrop.get_params(header, self.crop_scale,
                                                           list(CROP_RATIO))
            flip = self.hflip and bool(torch.rand(1) < 0.5)
        return data, (left, top, left + w, top + h), flip, self.labels[index]


def collate_encoded(batch):
    """One packed byte buffer + lengths (one shared-memory transfer per batch), boxes, flips,
    labels."""
    datas, boxes, flips, labels = zip(*batch, strict=True)
    return (torch.cat(datas), torch.tensor([len(d) for d in datas]),
            torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips), torch.tensor(labels))


class DeviceCropResize:
    """A collated :class:`EncodedCrops` batch -> normalised ``(B, C, S, S)`` float32 on ``device``.

    ``max_canvas`` bounds the padded canvas ``roi_align`` reads (elements), so a batch of mixed
    sizes is cut into chunks of similar-sized images instead of one huge padded tensor.
    """

    def __init__(self, img_size: int, channels: int, mean, std, device: torch.device | str,
                 resize: Resize = "roi_align", max_canvas: int = 2**27) -> None:
        if resize not in get_args(Resize):
            raise ValueError(f"resize {resize!r}: one of {get_args(Resize)}")
        self.size, self.channels, self.resize = img_size, channels, resize
        self.device, self.max_canvas = torch.device(device), max_canvas
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255

    def __call__(self, batch) -> torch.Tensor:
        buf, lengths, boxes, flips = batch[:4]
        images = self.decode(buf, lengths)
        crops = self._roi(images, boxes) if self.resize == "roi_align" else self._bicubic(
            images, boxes)
        flips = flips.to(self.device, non_blocking=True).view(-1, 1, 1, 1)
        crops = torch.where(flips, crops.flip(-1), crops)
        return (crops - self.mean) / self.std

    def decode(self, buf: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """uint8 ``(C, H, W)`` images on the device: JPEGs in one batched call (nvJPEG on CUDA),
        other formats on the CPU (torchvision, or PIL for what torchvision cannot read)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        mode = ImageReadMode.GRAY if self.channels == 1 else ImageReadMode.RGB
        datas = list(torch.split(buf, lengths.tolist()))
        jpegs = [i for i, d in enumerate(datas) if bytes(d[:2].tolist()) == JPEG_MAGIC]
        decoded = dict(zip(jpegs, decode_jpeg([datas[i] for i in jpegs], mode=mode,
                                              device=self.device) if jpegs else [], strict=True))
        return [decoded[i] if i in decoded else
                self._decode_other(d, mode).to(self.device, non_blocking=True)
                for i, d in enumerate(datas)]

    def _decode_other(self, data: torch.Tensor, mode) -> torch.Tensor:
        from torchvision.io import decode_image

        try:
            return tensor_to_8bit(decode_image(data, mode=mode))  # 16-bit PNGs decode as uint16
        except RuntimeError:  # a format torchvision's decoders lack; prepare checked PIL reads it
            from PIL import Image

            with Image.open(io.BytesIO(data.numpy().tobytes())) as raw:
                array = np.asarray(to_8bit(raw, "L" if self.channels == 1 else "RGB"))
            return torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1).copy()
                                    ).permute(2, 0, 1)

    def _roi(self, images: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        out = torch.empty(len(images), self.channels, self.size, self.size, device=self.device)
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
        """(B, C, Hmax, Wmax) float, each image top-left, its edge pixels replicated outwards
        (so bilinear samples at a crop's border never see padding): one ``cat`` and C gathers,
        whatever the batch size, instead of a Python loop of copies."""
        dev, c = self.device, self.channels
        hs, ws = [im.shape[1] for im in images], [im.shape[2] for im in images]
        flat = torch.cat([im.reshape(-1) for im in images])
        h = torch.tensor(hs, device=dev).view(-1, 1, 1)
        w = torch.tensor(ws, device=dev).view(-1, 1, 1)
        area = h * w
        start = torch.cumsum(c * area, 0) - c * area  # CHW planes, one image after another
        y = torch.minimum(torch.arange(max(hs), device=dev).view(1, -1, 1), h - 1)
        x = torch.minimum(torch.arange(max(ws), device=dev).view(1, 1, -1), w - 1)
        pixel = start + y * w + x
        return torch.stack([flat[pixel + k * area] for k in range(c)], dim=1).float()

    def _chunks(self, images: list[torch.Tensor]) -> list[list[int]]:
        """Groups of similar-sized images whose padded canvas stays under ``max_canvas``."""
        order = sorted(range(len(images)), key=lambda i: images[i].shape[1] * images[i].shape[2])
        chunks: list[list[int]] = []
        current: list[int] = []
        hmax = wmax = 0
        for i in order:
            h, w = images[i].shape[1:]
            nh, nw = max(hmax, h), max(wmax, w)
            if current and (len(current) + 1) * self.channels * nh * nw > self.max_canvas:
                chunks.append(current)
                current, nh, nw = [], h, w
            current.append(i)
            hmax, wmax = nh, nw
        return chunks + [current] if current else chunks

    def _bicubic(self, images: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        out = []
        for img, (x1, y1, x2, y2) in zip(images, boxes.round().int().tolist(), strict=True):
            crop = img[:, y1:y2, x1:x2].unsqueeze(0).float()
            out.append(F.interpolate(crop, size=(self.size, self.size), mode="bicubic",
                                     antialias=True, align_corners=False).clamp_(0, 255))
        return torch.cat(out)
