"""Store large images smaller: re-encode an image whose longer side exceeds ``data.max_side``.

Why: a loader decodes every sample of every epoch, and decoding a 12-megapixel photo to crop a
224 px view spends most of its time on pixels the model never sees, and its bytes on disk, in
the node cache and on the network. FFCV's ``max_resolution`` makes the same trade once, at
write time. Images already within the bound keep their bytes (a JPEG stays that JPEG), so with
``max_side: null`` (the default) nothing changes.

The re-encoded file is a baseline JPEG of the image resized (Lanczos) so that its longer side is
``max_side``, at ``jpeg_quality``: 8-bit gray or RGB, as every loader sees images
(:mod:`pilamim.data.bit_depth`; an alpha channel is dropped, as the loaders drop it). It is a
function of the file's bytes and the two settings only, so the shards stay byte-identical from
run to run (on one Pillow/libjpeg build). The manifest's sha256 stays the source file's: it
names the input that was checked, and the shards' own sha256 cover the stored bytes.
"""

from __future__ import annotations

import io

from pilamim.data.bit_depth import to_8bit
from pilamim.data.image_check import GRAY_MODES


def fit_max_side(data: bytes, max_side: int | None, quality: int) -> bytes:
    """``data`` itself when the image fits ``max_side`` (or there is no bound), else a JPEG of
    the image with its longer side resized to ``max_side``. Call it on a checked image only."""
    if max_side is None:
        return data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        if max(width, height) <= max_side:
            return data
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        gray = img.mode in GRAY_MODES
        img.draft("L" if gray else "RGB", size)  # JPEG: decode at >= size, not in full
        small = to_8bit(img, "L" if gray else "RGB").resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=quality, optimize=False, progressive=False)
    return out.getvalue()
