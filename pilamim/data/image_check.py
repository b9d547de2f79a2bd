"""Check one image file as the model will see it: decoded in full, hashed, its pixels summed.

Kept apart from :mod:`pilamim.data.prepare` (which lists, splits and writes the manifest) because
this is the per-image step, and the one that must bound memory on any input. Mean and std are
measured on images as the model sees them: every training image is decoded at no more than the
size needed (JPEG draft mode), brought to 8 bits (16-bit values scaled, not clipped), resized to
``img_size`` x ``img_size`` and only then summed in float64, so each image counts once whatever
its resolution and a huge image never becomes a huge float array. Images over PIL's pixel limit
(``PIL.Image.MAX_IMAGE_PIXELS``, a decompression bomb guard) are treated like undecodable ones:
skipped and listed, or refused with ``bad_images: fail``.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pilamim.data.bit_depth import to_8bit

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
STAT_DECIMALS = 6


@dataclass(frozen=True)
class CheckedImage:
    """One usable image: where it is, its hash, and pixel sums for mean/std (over the image
    resized to ``img_size``, so ``pixels`` is the same for every image)."""

    rel: str
    sha256: str
    gray: bool
    pixels: int
    sums: tuple[float, float, float]  # per RGB channel, values in [0, 1]
    squares: tuple[float, float, float]


def check_bytes(rel: str, data: bytes, skipped: list[dict[str, str]],
                img_size: int) -> CheckedImage | None:
    """Decode a whole file's bytes; return its hash and pixel sums, or record why it is
    unusable. Bytes, not a path: ``prepare`` reads each file once, from any source, and
    shards the very bytes it checked."""
    try:
        array, gray = _model_view(data, img_size)
    except Exception as err:  # PIL raises many exception types for bad files
        skipped.append({"path": rel, "reason": f"{type(err).__name__}: {err}"})
        return None
    if gray:
        s, q = float(array.sum()), float(np.square(array).sum())
        sums, squares = (s, s, s), (q, q, q)
    else:
        flat = array.reshape(-1, 3)
        sums = tuple(float(v) for v in flat.sum(axis=0))
        squares = tuple(float(v) for v in np.square(flat).sum(axis=0))
    pixels = array.shape[0] * array.shape[1]
    return CheckedImage(rel, hashlib.sha256(data).hexdigest(), gray, pixels, sums, squares)


def _model_view(data: bytes, img_size: int) -> tuple[np.ndarray, bool]:
    """Decode every byte of an image file; return it as the model sees it, and whether it is gray.

    The result is ``img_size`` x ``img_size`` in [0, 1] (float64, 1 or 3 channels): the whole
    image resized like a full-frame ``RandomResizedCrop``, so every image weighs the same in
    mean/std. Memory stays bounded: the pixel limit is checked from the header before any
    decoding, JPEGs are decoded at reduced scale (draft mode still reads the whole file, so a
    truncated one still fails) and float64 is only ever used at ``img_size``.
    """
    from PIL import Image

    with warnings.catch_warnings():
        # Over the limit PIL only warns below twice the limit; _refuse_bomb turns it into an error.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    with img:
        _refuse_bomb(img)
        gray = img.mode in GRAY_MODES
        img.draft(None, (img_size, img_size))
        img.load()
        small = to_8bit(img, "L" if gray else "RGB").resize(
            (img_size, img_size), Image.Resampling.BICUBIC)
    return np.asarray(small, dtype=np.float64) / 255.0, gray


def _refuse_bomb(img: PILImage) -> None:
    """Raise before decoding an image with more pixels than PIL's decompression-bomb limit.

    PIL itself only refuses at twice its limit and merely warns in between, which lets a small
    file expand into gigabytes; here the limit itself is the bound.
    """
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    width, height = img.size
    if limit and width * height > limit:
        raise Image.DecompressionBombError(
            f"{width} x {height} = {width * height:,} pixels is over the limit of {limit:,} "
            "(PIL.Image.MAX_IMAGE_PIXELS; a decompression bomb?); shrink the image, or raise "
            "the limit if it is genuine"
        )


def mean_std(train: list[CheckedImage], channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of the training pixels, in [0, 1] units.

    The pixels are those of each image resized to ``img_size``, so each image weighs the same.
    """
    pixels = sum(c.pixels for c in train)
    if pixels == 0:
        return [0.5] * channels, [0.5] * channels
    sums = np.array([c.sums for c in train], dtype=np.float64).sum(axis=0)
    squares = np.array([c.squares for c in train], dtype=np.float64).sum(axis=0)
    mean = sums / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean**2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)  # a constant channel must not divide by zero
    return ([round(float(m), STAT_DECIMALS) for m in mean[:channels]],
            [round(float(s), STAT_DECIMALS) for s in std[:channels]])
