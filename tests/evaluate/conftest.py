"""Fixtures for the evaluation tests (helpers live in eval_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_helpers import make_encoder, synthetic_images, write_encoder_dir
from torch.utils.data import TensorDataset


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add OpenMP contention on shared cores (30x slower
    measured on 2 busy cores). Scoped to these tests; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def encoder() -> torch.nn.Module:
    return make_encoder()


@pytest.fixture(scope="session")
def splits() -> dict[str, TensorDataset]:
    return {"train": synthetic_images(96, 0), "val": synthetic_images(32, 1),
            "test": synthetic_images(40, 2)}


@pytest.fixture
def encoder_dir(tmp_path: Path, encoder: torch.nn.Module) -> Path:
    return write_encoder_dir(tmp_path / "encoder", encoder)
