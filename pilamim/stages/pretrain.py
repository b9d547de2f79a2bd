"""Stage ``pretrain``: PiLaMIM pretraining, resumable; exports the encoder."""

from __future__ import annotations

from typing import Any

from pilamim.callbacks import Logger
from pilamim.config import Params
from pilamim.train import pretrain


def run(params: Params, logger: Logger | None = None) -> dict[str, Any]:
    return pretrain(params, logger)
