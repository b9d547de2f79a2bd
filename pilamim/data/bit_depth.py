"""Images of any bit depth as the 8-bit pictures every stage sees.

PIL's ``convert`` clips 16-bit values at 255, which turns all but the darkest 0.4 % of the
range white; keeping the high byte (``value >> 8``) keeps the picture. Statistics
(``prepare``) and every loader go through here, so the model sees what mean/std describe.
"""

from __future__ import annotations

from typing import Any

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
HIGH_BYTE = [value >> 8 for value in range(1 << 16)]  # 16-bit value -> 8-bit, as a PIL table


def to_8bit(img: Any, mode: str) -> Any:
    """A loaded copy of PIL ``img`` as an 8-bit ``mode`` ("L" or "RGB") image, 16-bit scaled.

    PIL's 32-bit mode "I" carries no bit depth, so it is taken as 16-bit when a value exceeds
    255 and as 8-bit otherwise.
    """
    if img.mode in SIXTEEN_BIT_MODES or (img.mode == "I" and img.getextrema()[1] > 255):
        img = img.convert("I").point(HIGH_BYTE, "L")
    return img.convert(mode)


def tensor_to_8bit(image: Any) -> Any:
    """A decoded uint16 tensor (torchvision decodes 16-bit PNGs so) as uint8, high byte kept."""
    import torch

    if image.dtype == torch.uint8:
        return image
    return (image.to(torch.int32) >> 8).clamp(0, 255).to(torch.uint8)
