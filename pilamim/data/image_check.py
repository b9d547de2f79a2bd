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
    sums: tuple[int, int, int]  # per RGB channel, of the 8-bit values (0..255): exact
    squares: tuple[int, int, int]


def check_bytes(rel: str, data: bytes, skipped: list[dict[str, str]],
                img_size: int) -> CheckedImage | None:
    """Decode a whole file's bytes; return its hash and pixel sums, or record why it is
    unusable. Bytes, not a path: ``prepare`` reads each file once, from any source, and
    shards the very bytes it checked."""
    try:
        small, gray = _model_view(data, img_size)
    except Exception as err:  # PIL raises many exception types for bad files
        skipped.append({"path": rel, "reason": f"{type(err).__name__}: {err}"})
        return None
    # Sums from the histogram (C, one pass, exact integers) rather than a float array: at
    # img_size 224 the float64 sums took 4x the time of decoding the image.
    counts = np.asarray(small.histogram(), dtype=np.int64).reshape(-1, 256)
    sums = [int(v) for v in counts @ _LEVELS]
    squares = [int(v) for v in counts @ _LEVELS_SQUARED]
    if gray:
        sums, squares = sums * 3, squares * 3
    return CheckedImage(rel, hashlib.sha256(data).hexdigest(), gray, small.width * small.height,
                        tuple(sums), tuple(squares))


_LEVELS = np.arange(256, dtype=np.int64)
_LEVELS_SQUARED = _LEVELS * _LEVELS


def _model_view(data: bytes, img_size: int) -> tuple[PILImage, bool]:
    """Decode every byte of an image file; return it as the model sees it, and whether it is gray.

    The result is an 8-bit ``img_size`` x ``img_size`` image (L or RGB): the whole image resized
    like a full-frame ``RandomResizedCrop``, so every image weighs the same in mean/std. Memory
    stays bounded: the pixel limit is checked from the header before any decoding, and JPEGs
    are decoded at reduced scale (draft mode still reads the whole file, so a truncated one
    still fails).
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
    return small, gray


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
    # Python ints: exact whatever the order the images are added in.
    sums = np.array([sum(c.sums[k] for c in train) for k in range(3)], dtype=np.float64)
    squares = np.array([sum(c.squares[k] for c in train) for k in range(3)], dtype=np.float64)
    mean = sums / (255.0 * pixels)
    std = np.sqrt(np.maximum(squares / (255.0**2 * pixels) - mean**2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)  # a constant channel must not divide by zero
    return ([round(float(m), STAT_DECIMALS) for m in mean[:channels]],
            [round(float(s), STAT_DECIMALS) for s in std[:channels]])
