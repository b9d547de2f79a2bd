"""Work-around for a timm/Pillow clash that crashes MAE-protocol fine-tuning at random.

timm's RandAugment ``inc1`` posterize keeps ``4 - int(level / 10 * 4)`` bits; with
``mstd0.5`` the sampled magnitude is clipped at 10, which asks for 0 bits. Pillow < 12 turned
that into an all-black image; Pillow 12+ raises ``ValueError: bits must be between or equal
to 1 and 8``, killing the epoch (about 0.3 % of images draw it). Inside :func:`safe_posterize`
timm's posterize op gets the old Pillow result back. Drop this when timm clamps the bits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from PIL import Image


def _posterize(img: Image.Image, bits_to_keep: int, **_kw) -> Image.Image:
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:  # what Pillow < 12 returned: every bit masked off
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


@contextlib.contextmanager
def safe_posterize() -> Iterator[None]:
    """Transforms built inside use the tolerant posterize (timm binds ops at build time)."""
    from timm.data import auto_augment

    names = [k for k in auto_augment.NAME_TO_OP if k.startswith("Posterize")]
    saved = {k: auto_augment.NAME_TO_OP[k] for k in names}
    auto_augment.NAME_TO_OP.update({k: _posterize for k in names})
    try:
        yield
    finally:
        auto_augment.NAME_TO_OP.update(saved)
