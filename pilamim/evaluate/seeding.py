"""Seed every RNG an evaluation touches, and give the caller's RNG state back afterwards.

torch (augmentations, head init, drop path), numpy (timm Mixup) and Python's ``random``
(timm RandAugment) all draw; seeding all three makes a run depend only on ``params.seed``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    cuda = [device.index or 0] if device is not None and device.type == "cuda" else []
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=cuda):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
