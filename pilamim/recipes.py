"""Recipe rules: how the paper's ImageNet recipe scales down to short runs and small images.

The paper's numbers (base lr 1.5e-4 x batch / 256 over 800 epochs, RandomResizedCrop 0.2-1
at 224 px, MAE's fine-tune regularisers over 100 epochs) are for ImageNet-scale schedules. At
a few hundred steps on 28-px images each of them leaves the encoder at its untrained level
(``docs/METHOD.md``, "Recipes at small budgets"). A params value of ``auto`` applies the rule
below, which gives back the paper's value at the paper's scale; a number keeps full control.
The resolved values are recorded with each run's metrics.
"""

from __future__ import annotations

import math

PAPER_BASE_LR = 1.5e-4
# At and beyond this many optimizer steps the paper's base lr holds (800 ImageNet epochs at
# batch 2048 are about 500k steps); below it the base lr grows as sqrt(LONG_RUN_STEPS / steps),
# up to SHORT_RUN_MAX_FACTOR: 10x at 1,000 steps and fewer. Measured at 156-312 steps on 2
# cores: 10x the paper's base lr gains 4 points of probe accuracy over 1x (docs/METHOD.md).
LONG_RUN_STEPS = 100_000
SHORT_RUN_MAX_FACTOR = 10.0

MAE_CROP_SCALE = (0.2, 1.0)
# A random crop keeps at least this many pixels on a side (at the model's input size). MAE's
# 0.2 minimum area at 224 px keeps about 100; at 28 px the same area is a 12-px crop zoomed
# 2.2x, which the probe (whole images) never sees. 48 px keeps MAE's crops at 112 px and up,
# narrows them in between (0.56 at 64 px) and turns cropping off at 48 px and below.
MIN_CROP_SIDE = 48

# MAE's fine-tune regularisers (Mixup, CutMix, RandAugment, random erasing) are sized for 100
# epochs; they make the training task harder to fit, which pays only once a model could overfit.
# Measured: 3 epochs under them leave even a randomly initialised encoder at chance.
MAE_REGULARISATION_MIN_EPOCHS = 30


def short_run_base_lr(total_steps: int) -> float:
    """The paper's base lr, scaled up for runs shorter than ``LONG_RUN_STEPS`` optimizer steps."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    factor = math.sqrt(LONG_RUN_STEPS / total_steps)
    return PAPER_BASE_LR * min(SHORT_RUN_MAX_FACTOR, max(1.0, factor))


def auto_crop_scale(img_size: int) -> tuple[float, float]:
    """RandomResizedCrop area range for ``img_size``: MAE's (0.2, 1) for large images,
    narrower for small ones so no crop side falls below ``MIN_CROP_SIDE`` pixels."""
    lowest = min(1.0, (MIN_CROP_SIDE / img_size) ** 2)
    return (max(MAE_CROP_SCALE[0], lowest), MAE_CROP_SCALE[1])


def uses_mae_regularisation(choice: str, epochs: int) -> bool:
    """``mae``: always; ``light``: never; ``auto``: from ``MAE_REGULARISATION_MIN_EPOCHS`` on."""
    if choice == "auto":
        return epochs >= MAE_REGULARISATION_MIN_EPOCHS
    if choice not in ("mae", "light"):
        raise ValueError(f"regularisation {choice!r}: one of 'auto', 'mae', 'light'")
    return choice == "mae"


def resolve_crop_scale(value: tuple[float, float] | str, img_size: int) -> tuple[float, float]:
    """A params ``crop_scale``: ``'auto'`` by :func:`auto_crop_scale`, else as given."""
    return auto_crop_scale(img_size) if value == "auto" else (float(value[0]), float(value[1]))


def resolve_base_lr(value: float | str, total_steps: int) -> float:
    """A params ``base_lr``: ``'auto'`` by :func:`short_run_base_lr`, else as given."""
    return short_run_base_lr(total_steps) if value == "auto" else float(value)
